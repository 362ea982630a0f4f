#!/usr/bin/env pwsh
# PowerShell twin of build.sh: the same commands and the same final line.
#   ./build.ps1 [build|test|run|eplb|bindings|bench|clean] [args]
param([string]$Command = "build", [Parameter(ValueFromRemainingArguments = $true)][string[]]$Rest = @())
$ErrorActionPreference = "Stop"
Set-Location $PSScriptRoot
$Root = (Get-Location).Path
$Config = if ($env:CONFIG) { $env:CONFIG } else { "Release" }
$BuildDir = if ($env:BUILD_DIR) { $env:BUILD_DIR } else { Join-Path $Root "build" }
$NativeDir = Join-Path $BuildDir "native"
$ResultsDir = Join-Path $BuildDir "test-results"
$env:EPLB_NATIVE_BUILD_DIR = $NativeDir
$env:DOTNET_CLI_TELEMETRY_OPTOUT = "1"; $env:DOTNET_NOLOGO = "1"

function Log($text) { Write-Host "== $text" }

function Build-Native {
    $nvcc = Get-Command nvcc -ErrorAction SilentlyContinue
    if ($nvcc -and -not $env:CUDAHOSTCXX -and (Get-Command g++-11 -ErrorAction SilentlyContinue)) {
        if ((& nvcc --version) -match "release 11\.") { $env:CUDAHOSTCXX = "g++-11" }
    }
    $enable = if ($env:EPLB_ENABLE_CUDA) { $env:EPLB_ENABLE_CUDA } else { "ON" }
    $require = if ($env:EPLB_REQUIRE_CUDA) { $env:EPLB_REQUIRE_CUDA } else { "OFF" }
    $archs = if ($env:EPLB_CUDA_ARCHS) { $env:EPLB_CUDA_ARCHS } else { "80;90" }
    $gen = @(); if (Get-Command ninja -ErrorAction SilentlyContinue) { $gen = @("-G", "Ninja") }
    if (-not (Test-Path (Join-Path $NativeDir "CMakeCache.txt"))) {
        cmake -S $Root -B $NativeDir @gen "-DCMAKE_BUILD_TYPE=$Config" "-DEPLB_ENABLE_CUDA=$enable" "-DEPLB_REQUIRE_CUDA=$require" "-DEPLB_CUDA_ARCHS=$archs"
    } else {
        cmake $NativeDir "-DEPLB_ENABLE_CUDA=$enable" "-DEPLB_REQUIRE_CUDA=$require"
    }
    if ($LASTEXITCODE -ne 0) { throw "cmake configure failed" }
    cmake --build $NativeDir --parallel
    if ($LASTEXITCODE -ne 0) { throw "native build failed" }
}

function Build-All {
    Log "native (libeplb, $Config)"; Build-Native
    Log "managed ($Config)"
    dotnet build (Join-Path $Root "Eplb.sln") -c $Config -nologo -v quiet -clp:ErrorsOnly
    if ($LASTEXITCODE -ne 0) { throw "managed build failed" }
}

function Attr([string]$file, [string]$element, [string]$name) {
    [xml]$xml = Get-Content $file -Raw
    $node = $xml.SelectSingleNode("//*[local-name()='$element']")
    if ($node -and $node.GetAttribute($name)) { return [int]$node.GetAttribute($name) } else { return 0 }
}

function Run-Tests {
    Build-All
    Remove-Item -Recurse -Force $ResultsDir -ErrorAction SilentlyContinue
    New-Item -ItemType Directory -Force $ResultsDir | Out-Null
    $passed = 0; $failed = 0; $skipped = 0
    Log "native tests (CTest)"
    ctest --test-dir $NativeDir --output-on-failure --output-junit (Join-Path $ResultsDir "ctest.xml")
    $junit = Join-Path $ResultsDir "ctest.xml"
    if (Test-Path $junit) {
        $t = Attr $junit "testsuite" "tests"; $f = Attr $junit "testsuite" "failures"
        $s = (Attr $junit "testsuite" "skipped") + (Attr $junit "testsuite" "disabled")
        $passed += $t - $f - $s; $failed += $f; $skipped += $s
    } else { $failed += 1 }
    # Eplb.TorchSharp.Tests is its own project so the GPU bundle of Eplb.Tests stays free of libtorch.
    foreach ($suite in @(@("Eplb.Tests", "managed"), @("Eplb.TorchSharp.Tests", "torchsharp"))) {
        $project, $name = $suite
        Log "$name tests (dotnet test $project)"
        dotnet test --project (Join-Path $Root "tests/$project/$project.csproj") -c $Config --no-build --no-progress `
            --results-directory $ResultsDir --report-trx --report-trx-filename "$name.trx"
        $trx = Join-Path $ResultsDir "$name.trx"
        if (Test-Path $trx) {
            $passed += Attr $trx "Counters" "passed"
            $failed += (Attr $trx "Counters" "failed") + (Attr $trx "Counters" "error") + (Attr $trx "Counters" "timeout") + (Attr $trx "Counters" "aborted")
            $skipped += (Attr $trx "Counters" "total") - (Attr $trx "Counters" "executed")
        } else { $failed += 1 }
    }
    Write-Output "tests: $passed passed, $failed failed, $skipped skipped"
    if ($failed -ne 0) { exit 1 }
}

$Cli = Join-Path $Root "managed/Eplb.Cli/bin/$Config/net10.0/eplb"
switch ($Command) {
    "build" { Build-All }
    "test" { Run-Tests }
    "run" { Build-All; & $Cli simulate @Rest; exit $LASTEXITCODE }
    "eplb" { Build-All; & $Cli @Rest; exit $LASTEXITCODE }
    "bindings" { dotnet run --project (Join-Path $Root "bindings/generator") -c $Config -- --repo $Root @Rest; exit $LASTEXITCODE }
    "bench" { Build-All; dotnet run --project (Join-Path $Root "tests/Eplb.Benchmarks") -c Release --no-build -- @Rest; exit $LASTEXITCODE }
    "clean" { Remove-Item -Recurse -Force $BuildDir -ErrorAction SilentlyContinue; dotnet clean (Join-Path $Root "Eplb.sln") -nologo -v quiet }
    default { Write-Error "usage: ./build.ps1 [build|test|run|eplb|bindings|bench|clean] [args]"; exit 2 }
}
