using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// Node-local replica selection through the managed layer (issue 15 §3): EplbLayerState carries the
/// node count and the calling rank's node into eplb_expert_map_t, the mapping epilogue picks a
/// replica on that node when the expert has one, and EplbState hands every rank its own node.
/// </summary>
public class NodeLocalSelectionTests
{
    // The documented rule (eplb_mapping.h): the (h mod m)-th of the m replicas on the source node, in
    // table order, else TokenHash over all replicas; h = (row * 2654435769) mod 2^32.
    private static int Expected(HostTables tables, int logical, int row, int nodes, int sourceNode)
    {
        var slots = tables.Log2Phy.AsSpan(logical * tables.MaxReplicas, tables.LogCnt[logical]).ToArray();
        var perNode = tables.Slots / nodes;
        var local = slots.Where(s => s / perNode == sourceNode).ToArray();
        var h = unchecked((uint)row * 2654435769u);
        return local.Length > 0 ? local[h % (uint)local.Length] : slots[h % (uint)slots.Length];
    }

    [TestCase(Backend.Cpu)]
    [TestCase(Backend.Cuda, Category = "GPU")]
    public void MappingPrefersAReplicaOnTheTokensNode(Backend backend)
    {
        if (backend == Backend.Cuda) TestSupport.RequireCuda();
        var random = TestSupport.NewRandom();
        foreach (var (logical, slots, nodes, tokens) in new[] { (256, 288, 4, 128), (61, 96, 8, 37), (7, 12, 3, 1) })
        {
            var tables = HostTables.Random(random, logical, slots, extraCapacity: 1);
            var ids = Enumerable.Range(0, tokens * 4).Select(_ => random.Next(logical)).ToArray();
            for (var source = 0; source < nodes; source++)
            {
                using var log2Phy = new DeviceBuffer<int>(backend, tables.Log2Phy);
                using var logCnt = new DeviceBuffer<int>(backend, tables.LogCnt);
                using var counters = new DeviceBuffer<int>(backend, slots);
                using var flag = new DeviceBuffer<int>(backend, [1]);
                using var input = new DeviceBuffer<int>(backend, ids);
                using var output = new DeviceBuffer<int>(backend, ids.Length);
                using var stream = new ComputeStream(backend);
                counters.Fill(0, stream: stream);
                output.Fill(-7, stream: stream);  // poisoned: every element must be written
                var state = new EplbLayerState(log2Phy, logCnt, counters, flag, logical, tables.MaxReplicas, slots, ReplicaSelection.NodeLocal,
                    nodes, source);
                ExpertMapping.MapToPhysical(stream, input, 4, state, output);
                var physical = output.ToArray(stream);
                for (var i = 0; i < ids.Length; i++)
                    Assert.That(physical[i], Is.EqualTo(Expected(tables, ids[i], i / 4, nodes, source)), $"N={logical} R={slots} node {source} pair {i}");
                var load = counters.ToArray(stream);
                Assert.That(load.Sum(), Is.EqualTo(ids.Length), "every pair is recorded on its slot");
            }
        }
    }

    [Test]
    public void TheStateRefusesNodesThatDoNotFit()
    {
        using var log2Phy = new DeviceBuffer<int>(Backend.Cpu, 12);
        using var logCnt = new DeviceBuffer<int>(Backend.Cpu, 12);
        using var counters = new DeviceBuffer<int>(Backend.Cpu, 12);
        using var flag = new DeviceBuffer<int>(Backend.Cpu, 1);
        var nodes = Assert.Throws<ArgumentException>(() => new EplbLayerState(log2Phy, logCnt, counters, flag, 12, 1, 12, ReplicaSelection.NodeLocal, 5, 0));
        Assert.That(nodes!.Message, Does.Contain("nodes = 5"));
        var source = Assert.Throws<ArgumentOutOfRangeException>(() => new EplbLayerState(log2Phy, logCnt, counters, flag, 12, 1, 12, ReplicaSelection.NodeLocal, 4, 4));
        Assert.That(source!.Message, Does.Contain("sourceNode"));
    }

    [Test]
    public void EplbStateGivesEveryRankItsOwnNode()
    {
        var options = new EplbOptions { RedundantExperts = 16, Nodes = 4, Groups = 4, ReplicaSelection = ReplicaSelection.NodeLocal };
        var ranks = Enumerable.Range(0, 8).Select(r => new SimulatedRank(r, 8, 2, 32, 48, [16])).ToArray();
        using var transport = new InProcessTransport(8);
        using var state = new EplbState(options, transport);
        state.AddModel("m", ranks);
        foreach (var rank in ranks)
            foreach (var layer in rank.LayerStates!)
            {
                Assert.That(layer.ReplicaSelection, Is.EqualTo(ReplicaSelection.NodeLocal));
                Assert.That(layer.Nodes, Is.EqualTo(4));
                Assert.That(layer.SourceNode, Is.EqualTo(rank.Rank / 2), $"rank {rank.Rank}");
            }
        foreach (var rank in ranks) rank.Dispose();
    }
}
