using System.Collections.Concurrent;
using System.Diagnostics;
using Microsoft.Extensions.Logging;
using NUnit.Framework;

namespace Eplb.Tests;

/// <summary>
/// Issue 13 §1-2 and issue 14 item 4: a layer switches whole on every rank or not at all under any
/// fault, sync and async; faults never escape Step; cancellation is bounded and safe from another
/// thread; async commit points by pass count; the skip thresholds; the rearrangement event.
/// </summary>
public class EplbFaultTests
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(10);

    private static EplbOptions Options(bool async, int interval = 8, int window = 8, int redundant = 4, int commitPasses = 0) => new()
    {
        UseAsync = async, WindowSize = window, StepInterval = interval, RedundantExperts = redundant, Groups = 4, Nodes = 1,
        AsyncCommitPasses = commitPasses, CancelTimeout = TimeSpan.FromSeconds(2),
    };

    private static bool Chain(Exception? e, Func<Exception, bool> match)
    {
        for (; e != null; e = e.InnerException)
        {
            if (match(e)) return true;
            if (e is AggregateException aggregate && aggregate.InnerExceptions.Any(inner => Chain(inner, match))) return true;
        }
        return false;
    }

    [Test, Combinatorial]
    public void AFaultAnywhereLeavesEveryLayerWholeOnEveryRankAndTheNextIntervalRetries(
        [Values(false, true)] bool async, [Values] Fault point, [Values(1, 2, 4, 9)] int call)
    {
        using var cluster = new FaultCluster(Options(async, redundant: 8));
        cluster.Faults.Arm(point, call);
        var completedAtFault = -1;
        for (var step = 1; step <= 120; step++)
        {
            if (cluster.State.IsRearranging) cluster.State.WaitForStagedLayer(Wait);
            cluster.Pass($"{point} call {call}, step {step}", FaultCluster.Drifting(step));
            if (cluster.Faults.Fired.Count > 0 && completedAtFault < 0) completedAtFault = cluster.State.CompletedRearrangements;
            if (completedAtFault >= 0 && cluster.State.CompletedRearrangements > completedAtFault && !cluster.State.IsRearranging) break;
        }
        Assert.That(cluster.Faults.Fired, Has.Count.EqualTo(1), $"call {call} of {point} was reached and failed");
        Assert.That(cluster.State.FailedRearrangements, Is.EqualTo(1));
        Assert.That(cluster.State.CancelledRearrangements, Is.Zero);
        Assert.That(cluster.State.CompletedRearrangements, Is.GreaterThan(completedAtFault), "the next interval tried again and completed");
        var failed = cluster.Events.Single(e => e.Outcome == RearrangementOutcome.Failed);
        Assert.That(Chain(failed.Exception, e => e is InjectedFault), Is.True, $"the event carries the real fault: {failed.Exception}");
        // The real exception is logged (never overwritten by "cancelled").
        Assert.That(cluster.Logger.Inner.Lines, Has.Some.Contains($"injected fault at {point}"));
        Assert.That(cluster.Logger.Inner.Lines, Has.None.Contains("cancelled"));
        Assert.That(cluster.Logger.Inner.Levels, Has.Some.EqualTo(LogLevel.Error));
        Assert.That(cluster.Model.UnsyncedMaps, Is.Zero);
    }

    [Test, Category("GPU")]
    public void AFaultAnywhereOnCudaBuffersLeavesEveryLayerWhole([Values] Fault point)
    {
        TestSupport.RequireCuda();
        using var cluster = new FaultCluster(Options(async: true, redundant: 8), backend: Backend.Cuda);
        cluster.Faults.Arm(point, 2);
        for (var step = 1; step <= 40; step++)
        {
            if (cluster.State.IsRearranging) cluster.State.WaitForStagedLayer(Wait);
            cluster.Pass($"{point}, step {step}", FaultCluster.Drifting(step));
        }
        Assert.That(cluster.Faults.Fired, Has.Count.EqualTo(1));
        Assert.That(cluster.State.FailedRearrangements, Is.EqualTo(1));
        Assert.That(cluster.State.CompletedRearrangements, Is.GreaterThanOrEqualTo(1));
    }

    [Test]
    public void AFaultInTheMiddleOfACommitUndoesTheRanksAlreadySwitched()
    {
        // Sync, so the whole model commits in one step: the fault on the third rank's hook comes
        // after two ranks heard the new map and every rank's weights and tables were switched.
        using var cluster = new FaultCluster(Options(async: false));
        var before = cluster.Snapshot();
        cluster.Faults.Arm(Fault.UpdateExpertMapAfterApplying, 3);
        cluster.Pass("step 1");
        cluster.Pass("step 2 (the rearrangement)");
        Assert.That(cluster.Faults.Fired, Has.Count.EqualTo(1));
        Assert.That(cluster.State.LayersCommitted, Is.Zero, "layer 0 fails, so nothing is committed");
        var after = cluster.Snapshot();
        Assert.That(after.Weights, Is.EqualTo(before.Weights), "every rank's weights bit for bit");
        Assert.That(after.Phy2Log, Is.EqualTo(before.Phy2Log));
        Assert.That(cluster.Faults.Calls(Fault.UpdateExpertMap), Is.EqualTo(6), "three hooks told the new map, then the same three the old one");
    }

    [Test]
    public void AHookThatRefusesTheOldMapIsToldAgainAtTheNextStep()
    {
        using var cluster = new FaultCluster(Options(async: false));
        // Commit: rank 0 and 1 hear the new map; rank 1's hook applies it and throws. Undo, last first:
        // rank 1 refuses the old map (throws before applying it), rank 0 takes it.
        cluster.Faults.Arm(Fault.UpdateExpertMapAfterApplying, 2);
        cluster.Faults.Arm(Fault.UpdateExpertMap, 3);
        cluster.Pass("step 1");
        cluster.Forward(FaultCluster.SkewedLoad);
        cluster.State.Step();
        Assert.That(cluster.Faults.Fired, Has.Count.EqualTo(2));
        Assert.That(cluster.Model.UnsyncedMaps, Is.EqualTo(1));
        Assert.That(cluster.Ranks[1].KnownPhy2Log(0).ToArray(), Is.Not.EqualTo(cluster.Model.Placement.Phy2Log(0).ToArray()),
            "rank 1 still holds the map it refused to give back");
        Assert.That(cluster.Logger.Inner.Lines, Has.Some.Contains("could not restore").And.Some.Contains("model map of rank 1"));
        cluster.Pass("step 3: told again");
        Assert.That(cluster.Model.UnsyncedMaps, Is.Zero);
    }

    [Test]
    public void AThrowingAllReduceWhilePlanningIsLoggedCountedAndRetried([Values(false, true)] bool async)
    {
        using var cluster = new FaultCluster(Options(async));
        cluster.Faults.Arm(Fault.AllReduceSum, 1);
        var before = cluster.Snapshot();
        cluster.Pass("step 1");
        cluster.Pass("step 2: planning fails");
        Assert.That(cluster.State.FailedRearrangements, Is.EqualTo(1));
        Assert.That(cluster.State.IsRearranging, Is.False);
        Assert.That(cluster.Snapshot().Weights, Is.EqualTo(before.Weights));
        Assert.That(cluster.Events.Single().Exception, Is.InstanceOf<InjectedFault>());
        Assert.That(cluster.Logger.Inner.Lines, Has.Some.Contains("injected fault at AllReduceSum"));
        for (var step = 3; step <= 14; step++)
        {
            if (cluster.State.IsRearranging) cluster.State.WaitForStagedLayer(Wait);
            cluster.Pass($"step {step}");
        }
        Assert.That(cluster.State.CompletedRearrangements, Is.EqualTo(1), "the interval after retries");
    }

    [Test]
    public void AThrowingBalancednessLogDoesNotStopTheStep()
    {
        var options = Options(async: false, interval: 1000);
        options.LogBalancedness = true;
        using var cluster = new FaultCluster(options);
        cluster.Faults.Arm(Fault.AllReduceSum, 1);
        cluster.Pass("step 1");
        cluster.Pass("step 2");
        Assert.That(cluster.State.StepFaults, Is.EqualTo(1));
        Assert.That(cluster.State.StepCount, Is.EqualTo(2));
        Assert.That(cluster.State.LastLoggedBalancedness, Is.Not.NaN, "the second pass is logged");
    }

    [Test]
    public void RandomFaultsAndCancellationsOverHundredsOfRuns()
    {
        var random = TestSupport.NewRandom();
        var points = Enum.GetValues<Fault>();
        var outcomes = new Dictionary<RearrangementOutcome, int>();
        for (var run = 0; run < 200; run++)
        {
            var async = random.Next(2) == 0;
            var options = Options(async, interval: random.Next(3, 9), window: random.Next(2, 9), redundant: 4 * random.Next(0, 3),
                commitPasses: async ? random.Next(0, 3) : 0);
            using var cluster = new FaultCluster(options, layers: random.Next(1, 5), seed: random.Next());
            for (var i = random.Next(0, 3); i > 0; i--) cluster.Faults.Arm(points[random.Next(points.Length)], random.Next(1, 25));
            var cancelAt = random.Next(3) == 0 ? random.Next(1, 20) : -1;
            var fromAnotherThread = random.Next(2) == 0;
            for (var step = 1; step <= 20; step++)
            {
                var when = $"run {run} ({(async ? "async" : "sync")}, {cluster.Faults.Fired.Count} faults), step {step}";
                if (step == cancelAt && !fromAnotherThread) cluster.State.CancelRearrangement();
                if (step == cancelAt && fromAnotherThread)
                {
                    var canceller = new Thread(() => cluster.State.CancelRearrangement());
                    canceller.Start();
                    cluster.Pass(when);
                    canceller.Join();
                    cluster.AssertViewsAgree(when + " (after the cancel)");
                    continue;
                }
                if (async && random.Next(2) == 0 && cluster.State.IsRearranging) cluster.State.WaitForStagedLayer(Wait);
                cluster.Pass(when, checkRouting: step % 3 == 0);
            }
            cluster.Pass($"run {run}, end");
            Assert.That(cluster.Model.UnsyncedMaps, Is.Zero, $"run {run}: every refused map was told again");
            cluster.State.CancelRearrangement();
            cluster.AssertViewsAgree($"run {run}, after the last cancel");
            Assert.That(cluster.State.IsRearranging, Is.False);
            Assert.That(cluster.Events.Count(e => e.Outcome != RearrangementOutcome.Skipped),
                Is.EqualTo(cluster.State.CompletedRearrangements + cluster.State.FailedRearrangements), $"run {run}: one event per rearrangement");
            foreach (var e in cluster.Events) outcomes[e.Outcome] = outcomes.GetValueOrDefault(e.Outcome) + 1;
        }
        TestContext.Out.WriteLine(string.Join(", ", outcomes.Select(p => $"{p.Key}: {p.Value}")));
        Assert.That(outcomes.GetValueOrDefault(RearrangementOutcome.Failed), Is.GreaterThan(20));
        Assert.That(outcomes.GetValueOrDefault(RearrangementOutcome.Completed), Is.GreaterThan(20));
    }

    [Test]
    public void CancelFromAnotherThreadWhileStepRunsIsSafe()
    {
        var errors = new ConcurrentQueue<Exception>();
        var cancelled = 0;
        for (var run = 0; run < 40; run++)
        {
            using var cluster = new FaultCluster(Options(async: run % 4 != 0, interval: 3, window: 3), seed: run);
            using var stop = new ManualResetEventSlim();
            var canceller = new Thread(() =>
            {
                while (!stop.IsSet)
                {
                    try
                    {
                        cluster.State.CancelRearrangement();
                        _ = cluster.State.IsRearranging;
                        _ = cluster.State.CompletedRearrangements + cluster.State.LayersCommitted;
                    }
                    catch (Exception e)
                    {
                        errors.Enqueue(e);
                    }
                    Thread.Yield();
                }
            });
            canceller.Start();
            try
            {
                for (var step = 1; step <= 25; step++) cluster.Pass($"run {run}, step {step}", checkRouting: step % 5 == 0);
            }
            finally
            {
                stop.Set();
                canceller.Join();
            }
            cancelled += cluster.State.CancelledRearrangements;
        }
        Assert.That(errors, Is.Empty, string.Join("\n", errors));
        Assert.That(cancelled, Is.GreaterThan(0), "some rearrangements were cancelled from the other thread");
    }

    [Test]
    public void ATransferThatIgnoresCancellationIsAbandonedWithinTheTimeout()
    {
        var options = Options(async: true);
        options.CancelTimeout = TimeSpan.FromMilliseconds(300);
        using var cluster = new FaultCluster(options);
        var before = cluster.Snapshot();
        cluster.Transport.Deaf = new ManualResetEventSlim(false);
        cluster.Pass("step 1");
        cluster.Pass("step 2: the worker starts and blocks in a transfer");
        Assert.That(SpinWait.SpinUntil(() => Volatile.Read(ref cluster.Transport.Blocked) > 0, Wait), Is.True);

        var clock = Stopwatch.StartNew();
        var stopped = cluster.State.CancelRearrangement();
        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(3)), "bounded by CancelTimeout");
        Assert.That(stopped, Is.False, "the transfer had to be abandoned");
        Assert.That(cluster.State.IsRearranging, Is.False);
        Assert.That(cluster.State.AbandonedTransfers, Is.EqualTo(1));
        var cancelled = cluster.Events.Single();
        Assert.That((cancelled.Outcome, cancelled.WorkerAbandoned, cancelled.LayersCommitted), Is.EqualTo((RearrangementOutcome.Cancelled, true, 0)));
        Assert.That(cluster.Logger.Inner.Lines, Has.Some.Contains("abandoned"));
        cluster.AssertViewsAgree("after the abandon");
        Assert.That(cluster.Snapshot().Weights, Is.EqualTo(before.Weights));

        // The stuck transfer wakes up and writes into its set-aside staging buffers; the next
        // rearrangement stages into new ones and completes.
        cluster.Transport.Deaf.Set();
        for (var step = 3; step <= 20; step++)
        {
            if (cluster.State.IsRearranging) cluster.State.WaitForStagedLayer(Wait);
            cluster.Pass($"step {step}");
        }
        Assert.That(cluster.State.CompletedRearrangements, Is.GreaterThanOrEqualTo(1));
    }

    [Test]
    public void DisposeAndCancelAreBoundedWhileASyncStepIsStuck()
    {
        var options = Options(async: false);
        options.CancelTimeout = TimeSpan.FromMilliseconds(300);
        using var cluster = new FaultCluster(options);
        cluster.Transport.Deaf = new ManualResetEventSlim(false);
        cluster.Pass("step 1");
        Exception? stepError = null;
        var stepper = new Thread(() =>
        {
            try
            {
                cluster.Forward(FaultCluster.SkewedLoad);
                cluster.State.Step();  // rearranges synchronously and blocks in the transfer
            }
            catch (Exception e)
            {
                stepError = e;
            }
        });
        stepper.Start();
        Assert.That(SpinWait.SpinUntil(() => Volatile.Read(ref cluster.Transport.Blocked) > 0, Wait), Is.True);
        var clock = Stopwatch.StartNew();
        Assert.That(cluster.State.CancelRearrangement(), Is.False, "the step holds the state");
        cluster.State.Dispose();
        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(3)));
        cluster.Transport.Deaf.Set();
        stepper.Join();
        Assert.That(stepError, Is.Null, "the stuck step returns normally once its transfer does");
        Assert.That(cluster.State.CancelledRearrangements, Is.EqualTo(1));
        Assert.That(cluster.State.LayersCommitted, Is.Zero);
        Assert.Throws<ObjectDisposedException>(() => cluster.State.Step());
    }

    [Test]
    public void AsyncCommitPassesMakeARunDependOnPassCountsOnly()
    {
        static List<string> Trace(int delayMs, int commitPasses)
        {
            using var cluster = new FaultCluster(Options(async: true, interval: 6, window: 4, commitPasses: commitPasses), layers: 4, seed: 7);
            cluster.Transport.MaxDelayMs = delayMs;
            var trace = new List<string>();
            for (var step = 1; step <= 36; step++)
            {
                cluster.Pass($"step {step}", checkRouting: false);
                trace.Add($"{step}: committed {cluster.State.LayersCommitted}, completed {cluster.State.CompletedRearrangements}, " +
                          $"skipped {cluster.State.SkippedIntervals}, placement {string.Join(",", cluster.Model.Placement.Phy2LogTable.ToArray())}");
            }
            return trace;
        }
        var quick = Trace(0, commitPasses: 2);
        var slow = Trace(4, commitPasses: 2);
        Assert.That(slow, Is.EqualTo(quick), "the same seed gives the same run whatever the transfers take");
        // A layer commits exactly 2 passes after its staging began: commits are 2 steps apart.
        var commitSteps = quick.Select((line, i) => (i, committed: long.Parse(line.Split("committed ")[1].Split(',')[0])))
            .Where((p, i) => i > 0 && p.committed > long.Parse(quick[i - 1].Split("committed ")[1].Split(',')[0]))
            .Select(p => p.i + 1).ToList();
        Assert.That(commitSteps, Has.Count.GreaterThanOrEqualTo(4));
        Assert.That(commitSteps.Take(4).Zip(commitSteps.Skip(1).Take(3), (a, b) => b - a), Is.All.EqualTo(2));
    }

    [Test]
    public void AlreadyBalancedEnoughIsSkippedLoggedCountedAndReported()
    {
        var options = Options(async: false);
        options.BalancednessThreshold = 0.75;
        using var cluster = new FaultCluster(options);
        var before = cluster.Snapshot();
        // Uniform load: the initial placement reaches 0.8 (ranks carry 3, 5, 5, 3 expert shares).
        double[] Uniform(int layer) => Enumerable.Repeat(1.0, 16).ToArray();
        cluster.Pass("step 1", Uniform);
        cluster.Pass("step 2", Uniform);
        Assert.That(cluster.State.SkippedRearrangements, Is.EqualTo(1));
        Assert.That(cluster.State.CompletedRearrangements + cluster.State.FailedRearrangements, Is.Zero);
        var skipped = cluster.Events.Single();
        Assert.That((skipped.Outcome, skipped.SkipReason), Is.EqualTo((RearrangementOutcome.Skipped, RearrangementSkipReason.BalancedEnough)));
        Assert.That(skipped.BalancednessBefore, Is.GreaterThanOrEqualTo(0.75).And.LessThanOrEqualTo(1.0));
        Assert.That(skipped.BalancednessAfter, Is.EqualTo(skipped.BalancednessBefore));
        Assert.That(double.IsNaN(skipped.BalancednessPlanned), Is.True, "no plan was made");
        Assert.That(cluster.Logger.Inner.Lines, Has.Some.Contains("skipped").And.Some.Contains("reaches the threshold 0.7500"));
        Assert.That(cluster.Snapshot().Weights, Is.EqualTo(before.Weights));

        // A skewed window is below the threshold: the next interval rearranges.
        for (var step = 3; step <= 10; step++) cluster.Pass($"step {step}");
        Assert.That(cluster.State.CompletedRearrangements, Is.EqualTo(1));
        Assert.That(cluster.Events.Last().BalancednessBefore, Is.LessThan(0.75));
    }

    [Test]
    public void APlanThatGainsTooLittleIsSkipped()
    {
        var options = Options(async: true);
        options.MinBalancednessGain = 0.99;
        using var cluster = new FaultCluster(options);
        var before = cluster.Snapshot();
        cluster.Pass("step 1");
        cluster.Pass("step 2");
        var skipped = cluster.Events.Single();
        Assert.That((skipped.Outcome, skipped.SkipReason), Is.EqualTo((RearrangementOutcome.Skipped, RearrangementSkipReason.GainTooSmall)));
        Assert.That(skipped.BalancednessPlanned - skipped.BalancednessBefore, Is.GreaterThan(0).And.LessThan(0.99));
        Assert.That(cluster.State.SkippedRearrangements, Is.EqualTo(1));
        Assert.That(cluster.State.IsRearranging, Is.False);
        Assert.That(cluster.Logger.Inner.Lines, Has.Some.Contains("less than 0.9900"));
        Assert.That(cluster.Snapshot().Weights, Is.EqualTo(before.Weights));

        // A reachable minimum lets the plan through.
        options.MinBalancednessGain = 0.05;
        using var accepting = new FaultCluster(options);
        for (var step = 1; step <= 8; step++)
        {
            if (accepting.State.IsRearranging) accepting.State.WaitForStagedLayer(Wait);
            accepting.Pass($"step {step}");
        }
        Assert.That(accepting.State.CompletedRearrangements, Is.EqualTo(1));
        Assert.That(accepting.State.SkippedRearrangements, Is.Zero);
    }

    [Test]
    public void AnEmptyWindowIsSkippedAsNoLoad()
    {
        using var cluster = new FaultCluster(Options(async: false));
        cluster.State.Step();
        cluster.State.Step();
        Assert.That(cluster.Events.Single().SkipReason, Is.EqualTo(RearrangementSkipReason.NoLoad));
        Assert.That(cluster.State.SkippedRearrangements, Is.EqualTo(1));
    }

    [TestCase(false)]
    [TestCase(true)]
    public void TheEventReportsWhatTheCountersCount(bool async)
    {
        using var cluster = new FaultCluster(Options(async, interval: 8));
        cluster.State.RearrangementEnded += (_, _) => throw new InvalidOperationException("a broken metrics handler");
        for (var step = 1; step <= 40 && (step <= 12 || cluster.State.IsRearranging); step++)
        {
            if (cluster.State.IsRearranging) cluster.State.WaitForStagedLayer(Wait);
            cluster.Pass($"step {step}");
        }
        Assert.That(cluster.State.IsRearranging, Is.False);
        var completed = cluster.Events.Where(e => e.Outcome == RearrangementOutcome.Completed).ToList();
        Assert.That(completed, Has.Count.EqualTo(cluster.State.CompletedRearrangements).And.Count.GreaterThanOrEqualTo(1));
        Assert.That(completed.Sum(e => e.LayersCommitted), Is.EqualTo(cluster.State.LayersCommitted));
        Assert.That(completed.Sum(e => e.SlotsMoved), Is.EqualTo(cluster.State.SlotsMoved));
        Assert.That(completed.Sum(e => e.ExpertsMoved), Is.EqualTo(cluster.State.ExpertsMoved));
        Assert.That(completed.Sum(e => e.BytesMoved), Is.EqualTo(cluster.State.BytesMoved).And.GreaterThan(0));
        var first = completed[0];
        Assert.That(first.Model, Is.SameAs(cluster.Model));
        Assert.That(first.LayersCommitted, Is.EqualTo(first.LayersPlanned));
        Assert.That(first.BalancednessPlanned, Is.GreaterThan(first.BalancednessBefore));
        Assert.That(first.BalancednessAfter, Is.EqualTo(first.BalancednessPlanned).Within(1e-12));
        Assert.That(first.Duration, Is.GreaterThan(TimeSpan.Zero));
        Assert.That(first.Step, Is.EqualTo(2), "the first interval falls at a quarter of 8");
        Assert.That(first.Exception, Is.Null);
        Assert.That(cluster.Logger.Inner.Lines, Has.Some.Contains("a broken metrics handler"), "a throwing handler is logged and ignored");
    }

    [Test]
    public void NewOptionsAreValidated()
    {
        var options = new EplbOptions
        {
            BalancednessThreshold = 0, MinBalancednessGain = 1.5, AsyncCommitPasses = -1, CancelTimeout = TimeSpan.FromSeconds(-1),
        };
        var violations = options.Violations();
        Assert.That(violations, Has.Count.EqualTo(4));
        Assert.That(violations, Has.Some.Contains("BalancednessThreshold").And.Some.Contains("MinBalancednessGain")
            .And.Some.Contains("AsyncCommitPasses").And.Some.Contains("CancelTimeout"));
        Assert.That(new EplbOptions { CancelTimeout = Timeout.InfiniteTimeSpan }.Violations(), Has.Count.EqualTo(1));
        var defaults = new EplbOptions();
        Assert.That((defaults.BalancednessThreshold, defaults.MinBalancednessGain, defaults.AsyncCommitPasses, defaults.CancelTimeout),
            Is.EqualTo(((double?)null, (double?)null, 0, TimeSpan.FromSeconds(10))));
        Assert.That(new EplbOptions { BalancednessThreshold = 1, MinBalancednessGain = 0 }.Violations(), Is.Empty);
    }
}
