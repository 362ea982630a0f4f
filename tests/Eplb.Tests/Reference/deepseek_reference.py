#!/usr/bin/env python3
"""Independent oracle for the `deepseek` placement policy tests.

A plain-Python (no torch, no numpy) transliteration of the algorithm of deepseek-ai/EPLB `eplb.py`
(`balanced_packing`, `replicate_experts`, `rebalance_experts_hierarchical`, `rebalance_experts`),
written from its description, with float32 arithmetic emulated by rounding after every operation
(exact for + - * / of float32 operands, since double has more than 2*24+2 bits). Any decision that
depends on a tie the reference leaves to torch (an unstable sort of equal weights of different
experts, or `max` over equal ratios) raises `Tie`, so only tie-free layers are compared.

  deepseek_reference.py cases --seed S --count C      random tie-free cases (JSON) for the fixture
  deepseek_reference.py plan --load F --replicas R --groups G --nodes N --gpus P
                                                      one row per MoE layer of a load dump: phy2log
                                                      and logcnt, or null where the layer has a tie
"""
import argparse
import json
import random
import struct
import sys


def f32(x):
    return struct.unpack('f', struct.pack('f', x))[0]


class Tie(Exception):
    pass


def balanced_packing(weight, packs, owner=None):
    n = len(weight)
    per_pack = n // packs
    if per_pack == 1:
        return list(range(n)), [0] * n
    order = sorted(range(n), key=lambda i: -weight[i])  # Python's sort is stable
    for a, b in zip(order, order[1:]):
        # Equal weights of one expert's replicas are interchangeable; of two experts they are not.
        if weight[a] == weight[b] and (owner is None or owner[a] != owner[b]):
            raise Tie()
    pack_weight = [0.0] * packs
    pack_items = [0] * packs
    pack_of = [-1] * n
    rank_of = [-1] * n
    for i in order:
        pack = min((p for p in range(packs) if pack_items[p] < per_pack), key=lambda p: pack_weight[p])
        pack_of[i] = pack
        rank_of[i] = pack_items[pack]
        pack_weight[pack] = f32(pack_weight[pack] + weight[i])
        pack_items[pack] += 1
    return pack_of, rank_of


def replicate_experts(weight, physical):
    n = len(weight)
    phy2log = list(range(n))
    count = [1] * n
    for _ in range(n, physical):
        ratio = [f32(weight[i] / count[i]) for i in range(n)]
        top = max(ratio)
        if ratio.count(top) > 1:
            raise Tie()
        best = ratio.index(top)
        phy2log.append(best)
        count[best] += 1
    return phy2log, count


def rebalance_layer(weight, replicas, groups, nodes, gpus):
    n = len(weight)
    if not (groups % nodes == 0 and n % groups == 0):
        groups, nodes = 1, 1
    group_size = n // groups
    groups_per_node = groups // nodes
    per_gpu = replicas // gpus
    group_weight = [f32(sum(weight[g * group_size:(g + 1) * group_size])) for g in range(groups)]
    group_pack, group_rank = balanced_packing(group_weight, nodes)
    mlog2log = [0] * n
    for g in range(groups):
        for j in range(group_size):
            mlog2log[(group_pack[g] * groups_per_node + group_rank[g]) * group_size + j] = g * group_size + j
    per_node = n // nodes
    slots_per_node = replicas // nodes
    phy2log = [0] * replicas
    logcnt = [0] * n
    for node in range(nodes):
        local = [weight[mlog2log[node * per_node + i]] for i in range(per_node)]
        phy2mlog, count = replicate_experts(local, slots_per_node)
        item = [f32(local[m] / count[m]) for m in phy2mlog]
        pack, rank = balanced_packing(item, gpus // nodes, phy2mlog)
        for p, m in enumerate(phy2mlog):
            phy2log[node * slots_per_node + pack[p] * per_gpu + rank[p]] = mlog2log[node * per_node + m]
        for i in range(per_node):
            logcnt[mlog2log[node * per_node + i]] = count[i]
    return phy2log, logcnt


def random_cases(seed, count):
    rnd = random.Random(seed)
    cases = []
    while len(cases) < count:
        gpus = rnd.choice([1, 2, 3, 4, 6, 8])
        nodes = rnd.choice([d for d in (1, 2, 3, 4) if gpus % d == 0])
        groups = rnd.choice([1, 2, 3, 4, 6])
        experts = groups * rnd.randint(1, 4)
        replicas = gpus * rnd.randint(1, 4)
        while replicas < experts:
            replicas += gpus
        layers = rnd.randint(1, 2)
        weight = [[rnd.choice([round(rnd.uniform(0, 1000), 3), rnd.randint(1, 10 ** 7)]) for _ in range(experts)]
                  for _ in range(layers)]
        try:
            rows = [rebalance_layer([f32(x) for x in w], replicas, groups, nodes, gpus) for w in weight]
        except Tie:
            continue
        cases.append({'weight': weight, 'replicas': replicas, 'groups': groups, 'nodes': nodes, 'gpus': gpus,
                      'phy2log': [r[0] for r in rows], 'logcnt': [r[1] for r in rows]})
    return cases


def plan_file(path, replicas, groups, nodes, gpus):
    with open(path) as f:
        dump = json.load(f)
    rows = dump['logical_count'] if isinstance(dump, dict) else dump
    out = []
    for row in rows:
        if sum(row) <= 0:
            continue
        try:
            phy2log, logcnt = rebalance_layer([f32(x) for x in row], replicas, groups, nodes, gpus)
            out.append({'phy2log': phy2log, 'logcnt': logcnt})
        except Tie:
            out.append(None)
    return out


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest='command', required=True)
    cases = sub.add_parser('cases')
    cases.add_argument('--seed', type=int, default=1)
    cases.add_argument('--count', type=int, default=60)
    plan = sub.add_parser('plan')
    plan.add_argument('--load', required=True)
    for name in ('replicas', 'groups', 'nodes', 'gpus'):
        plan.add_argument('--' + name, type=int, required=True)
    args = parser.parse_args()
    if args.command == 'cases':
        result = random_cases(args.seed, args.count)
    else:
        result = plan_file(args.load, args.replicas, args.groups, args.nodes, args.gpus)
    # One case or layer per line: readable diffs of the committed fixture.
    sys.stdout.write('[\n' + ',\n'.join(json.dumps(r, separators=(',', ':')) for r in result) + '\n]\n')


if __name__ == '__main__':
    main()
