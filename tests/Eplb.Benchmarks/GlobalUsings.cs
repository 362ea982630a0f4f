// The benchmarks measure every layer of managed/; one list of namespaces instead of one per file.
global using Eplb.Balancing;
global using Eplb.Kernels;
global using Eplb.Load;
global using Eplb.Migration;
global using Eplb.Placement;
global using Eplb.Runtime;
