namespace Eplb.Placement;

/// <summary>docs/design.md §2.2 on one rank's slots (vLLM <c>preserve_intragpu_slots</c>).</summary>
internal static class SlotPreservation
{
    /// <summary>
    /// Writes into <paramref name="result"/> the experts of <paramref name="planned"/>, reordered so
    /// that each old slot, in order, keeps its expert when the plan has an unclaimed copy of it (the
    /// first one); the unclaimed planned experts then fill the free slots, both in ascending order.
    /// </summary>
    public static void Preserve(ReadOnlySpan<int> planned, ReadOnlySpan<int> old, Span<int> result, Span<bool> claimed, Span<bool> kept)
    {
        var n = planned.Length;
        claimed = claimed[..n];
        kept = kept[..n];
        claimed.Clear();
        kept.Clear();
        for (var s = 0; s < n; s++)
        {
            for (var i = 0; i < n; i++)
            {
                if (claimed[i] || planned[i] != old[s]) continue;
                claimed[i] = true;
                kept[s] = true;
                result[s] = old[s];
                break;
            }
        }
        var next = 0;
        for (var s = 0; s < n; s++)
        {
            if (kept[s]) continue;
            while (claimed[next]) next++;
            result[s] = planned[next++];
        }
    }
}
