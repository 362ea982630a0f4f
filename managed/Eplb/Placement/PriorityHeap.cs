namespace Eplb.Placement;

/// <summary>
/// A binary heap of item ids over caller-owned keys, ordered by key and then by id: the top is the
/// item a linear "first strictly better" scan in id order would pick, so replacing such a scan by
/// the heap changes no result (the DeepSeek tie rules: lowest index wins among equals).
/// </summary>
internal static class PriorityHeap
{
    /// <summary>Max-heap on <paramref name="key"/> (ties: lowest id first).</summary>
    public static void BuildMax(Span<int> heap, ReadOnlySpan<float> key)
    {
        for (var i = heap.Length / 2 - 1; i >= 0; i--) SiftDownMax(heap, key, i);
    }

    /// <summary>Restores the max-heap after the top's key changed.</summary>
    public static void SiftDownMax(Span<int> heap, ReadOnlySpan<float> key, int i)
    {
        var item = heap[i];
        while (true)
        {
            var child = 2 * i + 1;
            if (child >= heap.Length) break;
            if (child + 1 < heap.Length && Above(heap[child + 1], heap[child], key)) child++;
            if (!Above(heap[child], item, key)) break;
            heap[i] = heap[child];
            i = child;
        }
        heap[i] = item;
    }

    /// <summary>Restores the max-heap after the item at <paramref name="i"/> was added or its key grew.</summary>
    public static void SiftUpMax(Span<int> heap, ReadOnlySpan<float> key, int i)
    {
        var item = heap[i];
        while (i > 0)
        {
            var parent = (i - 1) / 2;
            if (!Above(item, heap[parent], key)) break;
            heap[i] = heap[parent];
            i = parent;
        }
        heap[i] = item;
    }

    /// <summary>Whether item <paramref name="a"/> comes before <paramref name="b"/> in a max-heap (ties: lowest id).</summary>
    public static bool Above(int a, int b, ReadOnlySpan<float> key) => key[a] > key[b] || (key[a] == key[b] && a < b);

    /// <summary>Min-heap on <paramref name="key"/> (ties: lowest id first).</summary>
    public static void BuildMin(Span<int> heap, ReadOnlySpan<float> key)
    {
        for (var i = heap.Length / 2 - 1; i >= 0; i--) SiftDownMin(heap, key, i);
    }

    /// <summary>Restores the min-heap after the top's key changed.</summary>
    public static void SiftDownMin(Span<int> heap, ReadOnlySpan<float> key, int i)
    {
        var item = heap[i];
        while (true)
        {
            var child = 2 * i + 1;
            if (child >= heap.Length) break;
            if (child + 1 < heap.Length && Below(heap[child + 1], heap[child], key)) child++;
            if (!Below(heap[child], item, key)) break;
            heap[i] = heap[child];
            i = child;
        }
        heap[i] = item;
    }

    private static bool Below(int a, int b, ReadOnlySpan<float> key) => key[a] < key[b] || (key[a] == key[b] && a < b);
}
