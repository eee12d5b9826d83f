#!/usr/bin/env python3
"""Discrete-event simulation of per-host overflow policies (3 hosts x unicorn-style W=2 workers).

Each host: an app server with a UNIX listener (its queue holds 6; the 7th connect gets EAGAIN) and
a TCP listener (unbounded), pulled by W workers; a free worker takes the next waiting connection,
alternating between the two listeners like unicorn's accept loop (--accept fifo: oldest first).
Each host's front proxy gets 1/3 of an open-loop Poisson stream and picks, per request, the local
UNIX socket (d = UNIX) or a host's TCP port (d = 0..2; a remote one adds HOP before it queues).
Policies A-G are the brief's; H is the first study's variant (late binding), with what failproxy
did before issue 20: peers assumed to have this box's W, a request held past HOLD sent home.
Copied from ../shared/overflow-sim (RESULTS-seed.md is that study's report) and extended for
issue 20 with route-aware policies (the request's class is known, as route learning tells it):
  I  H + classes: fast requests held first, slow ones after every held fast one and never sent
     into an accept queue; a fast one held past HOLD goes where (ours beyond W + 1) x service / W
     is least; peers' true W known (an oracle of the learned concurrency)
  J  I, and a slow request leaves the last free local worker to fast ones (overflows first)
  K  I with each peer's concurrency learned from latency (AIMD, capacity.py's rule), not known
  L  K, and any slowed answer closes the peer (limit 0) for a doubling back-off
  M  K, and a slowed *slow* answer (> SLOW_TOL x its time) closes the peer to slow requests only
     for a doubling back-off: what failproxy builds (capacity.py)
Workload bigpeers: host1 has 1 worker and 3-s actions, hosts 2-3 have 16 workers each.
Stdlib only; RESULTS.md.
  python3 sim.py                         # 5 workloads x 2 service laws x 13 policies x 5 seeds
  python3 sim.py -w skew800 -d fixed -p ABHM -s 1
"""
import argparse, heapq, math, random, statistics
from collections import deque
from multiprocessing import Pool

H, W, UNIX_CAP, HOP, TAU = 3, 2, 6, 0.0002, 10.0   # hosts, workers, UNIX queue, hop s, EWMA decay s
HOLD = 2.0                    # failproxy's hold_timeout (policies H, I, J)
UNIX = H                      # destination index of the local UNIX socket; 0..H-1 = TCP port of host d
DONE, DELIVER, TIMEOUT, TICK = 0, 1, 2, 3   # event kinds
RETRY_TICK = 0.005            # I, J: while anything is held, look again this often (others' work ends unseen)
WORKLOADS = {  # name: (total req/s, per front: (slow share, slow mean s, fast mean s)[, workers per host])
    'skew100': (150, [(0.6, 0.100, 0.001), (0, 0, 0.001), (0, 0, 0.001)]),
    'skew800': (90, [(0.1, 0.800, 0.005), (0, 0, 0.005), (0, 0, 0.005)]),
    'capacity': (90, [(0.1, 0.800, 0.005)] * 3),
    'nooverload': (150, [(0, 0, 0.001)] * 3),
    # peers unlike this box: host1 has one worker and 3-s actions; hosts 2-3 have 16 workers each
    'bigpeers': (240, [(0.05, 3.0, 0.005), (0, 0, 0.005), (0, 0, 0.005)], [1, 16, 16]),
}
POLICIES = 'ABCDEFGHIJKLM'
GROW_TOL, SHRINK, SLOW_TOL = 3.0, 0.75, 1.5  # K: an answer within GROW_TOL x its route's time grows the limit; slower shrinks it


MEANS = {}


def make_requests(workload, law, seed, dur):
    """Arrivals and service times, drawn once per (workload, law, seed): every policy sees the same."""
    rng = random.Random(f'{workload}/{law}/{seed}')
    rate, mix = WORKLOADS[workload][:2]
    reqs = []
    for front, (p_slow, slow_s, fast_s) in enumerate(mix):
        MEANS[workload, front] = (slow_s, fast_s)
        t = rng.expovariate(rate / H)
        while t < dur:
            slow = rng.random() < p_slow
            mean = slow_s if slow else fast_s
            reqs.append([t, front, slow, rng.expovariate(1 / mean) if law == 'exp' else mean, None, None, None])
            t += rng.expovariate(rate / H)
    reqs.sort(key=lambda r: r[0])
    return reqs  # r = [arrival, front, slow, service, dest, sent at, queued at]


class Sim:
    def __init__(s, policy, accept='alt', workers=(W,) * H):
        s.policy, s.fifo, s.name = getattr(s, 'pol_' + policy), accept == 'fifo', policy
        s.W = list(workers)                                 # workers per host
        s.heap, s.seq = [], 0
        s.q = [[deque(), deque()] for _ in range(H)]        # per host: [UNIX queue, TCP queue]
        s.idle = [list(range(n)) for n in s.W]              # idle worker ids per host
        s.last = [[1] * n for n in s.W]                     # listener each worker served last
        s.load = [0] * H                                    # G only: requests assigned, not finished
        s.inf = [[0] * (H + 1) for _ in range(H)]           # proxy f's in-flight requests per destination
        s.ewma = [[0.0] * (H + 1) for _ in range(H)]        # F: proxy f's peak-EWMA response time
        s.stamp = [[0.0] * (H + 1) for _ in range(H)]
        s.down, s.rr = [0.0] * H, [0] * H                   # A: UNIX benched until; backup round robin
        s.held = [deque() for _ in range(H)]                # H: requests held in proxy f
        s.held_slow = [deque() for _ in range(H)]           # I, J: slow-route requests held in proxy f
        s.svc = [[0.005] * (H + 1) for _ in range(H)]
        s.ticking = [False] * H
        s.conc = [[float(s.W[f])] * (H + 1) for f in range(H)]  # K: proxy f's learned concurrency per destination
        s.means = {}                                         # K: route time as learned (here: the class mean)
        s.probe_at = [[0.0] * (H + 1) for _ in range(H)]     # L: a peer found queueing is probed again then
        s.backoff = [[1.0] * (H + 1) for _ in range(H)]
        s.closed = [[0.0] * (H + 1) for _ in range(H)]       # M: no slow-route requests to that peer until then
        s.reserve = policy == 'J'                           # J: slow-route requests leave the last local worker       # I, J: proxy f's learned service time per destination
        s.sent = [[0] * (H + 1) for _ in range(H)]          # connects that succeeded [front][dest]
        s.eagain = 0
        s.lat = []                                          # (latency, slow?, front)

    # --- mechanics -------------------------------------------------------------------------------
    def push(s, t, kind, h, x):
        s.seq += 1
        heapq.heappush(s.heap, (t, s.seq, kind, h, x))

    def send(s, f, r, d, t):
        """Proxy f connects r to destination d; False only for EAGAIN on a full UNIX queue."""
        if d == UNIX and len(s.q[f][0]) >= UNIX_CAP:
            s.eagain += 1
            return False
        h = f if d == UNIX else d
        r[4], r[5] = d, t
        r.append(s.inf[f][d] + 1)                           # K: ours in flight there, this one counted
        s.inf[f][d] += 1
        s.sent[f][d] += 1
        s.load[h] += 1
        if h == f:
            s.arrive(t, h, 0 if d == UNIX else 1, r)
        else:
            s.push(t + HOP, DELIVER, h, r)
        return True

    def arrive(s, t, h, sock, r):
        if s.idle[h]:
            s.start(t, h, s.idle[h].pop(), sock, r)
        else:
            r[6] = t
            s.q[h][sock].append(r)

    def start(s, t, h, w, sock, r):
        s.last[h][w] = sock
        s.push(t + r[3], DONE, h, (w, r))

    def finish(s, t, h, w, r):
        f, d = r[1], r[4]
        s.lat.append((t - r[0], r[2], f))
        s.inf[f][d] -= 1
        s.load[h] -= 1
        rt, e = t - r[5], s.ewma[f][d]                      # Finagle PeakEwma: peak, else decay
        k = math.exp(-(t - s.stamp[f][d]) / TAU)
        s.ewma[f][d], s.stamp[f][d] = (rt if rt > e else e * k + rt * (1 - k)), t
        s.svc[f][d] += 0.1 * (rt - s.svc[f][d])
        if s.name in 'KLM' and d != UNIX:              # K, L, M: the peer's concurrency, AIMD on its latency
            expected = s.means.get((r[1], r[2]), 0.005)
            if rt > (SLOW_TOL if r[2] and s.name == 'M' else GROW_TOL) * expected + 0.002:
                # L: a peer that queues ours gets none but probes; M: slow ones only, see below
                floor = 0.0 if s.name == 'L' else 1.0
                if s.name == 'M' and r[2]:              # M: it queued a slow one: no slow ones there for a while
                    s.closed[f][d] = t + s.backoff[f][d]
                    s.backoff[f][d] = min(16.0, 2 * s.backoff[f][d])
                s.conc[f][d] = max(floor, min(s.conc[f][d], r[-1]) * SHRINK)
                if s.conc[f][d] < 1 and s.name == 'L':
                    s.probe_at[f][d] = t + s.backoff[f][d]
                    s.backoff[f][d] = min(16.0, 2 * s.backoff[f][d])
            else:
                if r[2] or s.name != 'M':
                    s.backoff[f][d] = 1.0
                if r[-1] >= s.conc[f][d]:
                    s.conc[f][d] = r[-1] + 1.0
        uq, tq = s.q[h]
        if uq and tq:                                       # both listeners hold a connection
            sock = (0 if uq[0][6] <= tq[0][6] else 1) if s.fifo else 1 - s.last[h][w]
            s.start(t, h, w, sock, s.q[h][sock].popleft())
        elif uq or tq:
            s.start(t, h, w, 0 if uq else 1, (uq or tq).popleft())
        else:
            s.idle[h].append(w)
        if s.held[f] or s.held_slow[f]:
            s.release(f, t)

    def run(s, reqs):
        heap, i, n = s.heap, 0, len(reqs)
        while i < n or heap:
            if heap and (i == n or heap[0][0] <= reqs[i][0]):
                t, _, kind, h, x = heapq.heappop(heap)
                if kind == DONE:
                    s.finish(t, h, *x)
                elif kind == TIMEOUT:
                    s.timeout(t, h, x)
                elif kind == TICK:
                    s.ticking[h] = False
                    s.release(h, t)
                    s.arm(h, t)
                else:
                    s.arrive(t, h, 1, x)
            else:
                r = reqs[i]
                i += 1
                s.policy(r[1], r, r[0])
        return s

    # --- policies: front f, request r, time t; ring(f) = [f+1, f+2, f] (TCP ports) ----------------
    def ring(s, f):
        return [(f + 1) % H, (f + 2) % H, f]

    def unix_or(s, f, r, t, d):
        if not s.send(f, r, UNIX, t):
            s.send(f, r, d, t)

    def pol_A(s, f, r, t):          # nginx seed: EAGAIN benches UNIX until the next second; backups RR
        if t >= s.down[f]:
            if s.send(f, r, UNIX, t):
                return
            s.down[f] = math.floor(t) + 1
        s.send(f, r, s.ring(f)[s.rr[f]], t)
        s.rr[f] = (s.rr[f] + 1) % H

    def pol_B(s, f, r, t):          # ordered ring: EAGAIN -> first backup (f+1's TCP never refuses)
        s.unix_or(f, r, t, (f + 1) % H)

    def pol_C(s, f, r, t):          # max_queue=1: skip UNIX when its accept queue holds >= 1
        if s.q[f][0]:
            s.send(f, r, (f + 1) % H, t)
        else:
            s.unix_or(f, r, t, (f + 1) % H)

    def pol_D(s, f, r, t):          # max_conns=W: skip UNIX with W of our own requests in flight to it
        if s.inf[f][UNIX] >= W:
            s.send(f, r, (f + 1) % H, t)
        else:
            s.unix_or(f, r, t, (f + 1) % H)

    def pol_E(s, f, r, t):          # idle worker locally, else least in-flight backup (ring order ties)
        if s.inf[f][UNIX] < W and s.send(f, r, UNIX, t):
            return
        s.send(f, r, min(s.ring(f), key=lambda d: s.inf[f][d]), t)

    def pol_F(s, f, r, t):          # E, but P2C over the 2 peers by (inflight+1)*peakEWMA; own TCP last
        if s.inf[f][UNIX] < W and s.send(f, r, UNIX, t):
            return
        s.send(f, r, min(s.ring(f), key=lambda d: (s.inf[f][d] + 1) * s.ewma[f][d]), t)

    def pol_G(s, f, r, t):          # oracle JSQ: host with fewest assigned-unfinished, local on ties
        h = min([f, (f + 1) % H, (f + 2) % H], key=lambda h: s.load[h])
        if h != f or not s.send(f, r, UNIX, t):
            s.send(f, r, h, t)

    def slot(s, f):                 # H: a destination with an idle worker as far as proxy f can tell
        mine = s.inf[f][UNIX] + s.inf[f][f]                 # UNIX and own TCP share the local workers
        w = s.W[f]                                          # peers are assumed to have this box's W
        if mine < w and not s.q[f][0] and not s.q[f][1]:   # + local accept queues (sock_diag)
            return UNIX
        peer = min(s.ring(f)[:2], key=lambda d: s.inf[f][d])
        return peer if s.inf[f][peer] < w else None

    def pol_H(s, f, r, t):          # late binding: no slot -> hold in the proxy (FIFO) until one frees
        d = None if s.held[f] else s.slot(f)
        if d is None:
            s.hold(f, r, t, s.held[f])
        else:
            s.send(f, r, d, t)

    def arm(s, f, t):
        if (s.held[f] or s.held_slow[f]) and not s.ticking[f] and s.name != 'H':
            s.ticking[f] = True
            s.push(t + RETRY_TICK, TICK, f, None)

    def go(s, f, r, d, t):          # I, J: a full UNIX backlog (EAGAIN) sends it where its wait is least
        if not s.send(f, r, d, t):
            s.send(f, r, s.least_wait(f, True), t)

    def hold(s, f, r, t, queue):
        queue.append(r)
        s.arm(f, t)
        if not r[2]:                                        # I, J, K: a slow-route request waits its turn
            s.push(t + HOLD, TIMEOUT, f, r)

    def timeout(s, t, f, r):        # hold_timeout: H sends it home; I and J where its wait is least
        for queue in (s.held[f], s.held_slow[f]):
            if r in queue:
                queue.remove(r)
                if s.name == 'H':
                    s.send(f, r, f, t)
                else:
                    s.go(f, r, s.least_wait(f), t)

    def least_wait(s, f, tcp=False):  # I, J: (ours ahead + 1) x service / concurrency, the least
        def wait(d):
            h = f if d in (UNIX, f) else d
            n = s.inf[f][UNIX] + s.inf[f][f] if h == f else s.inf[f][d]
            return max(0, n - s.W[h] + 1) * s.svc[f][d] / s.W[h]
        return min([f if tcp else UNIX] + s.ring(f)[:2], key=wait)

    def room(s, f, slow, t=0.0):           # I, J: a destination with a free worker for this class
        w = s.W
        free = w[f] - s.inf[f][UNIX] - s.inf[f][f] if not s.q[f][0] and not s.q[f][1] else 0
        need = 2 if slow and s.reserve else 1               # J: slow overflows first, keeps one home
        if free >= need:
            return UNIX
        if s.name in 'KLM':
            w = [max(int(c), 1 if t >= s.probe_at[f][i] else 0) for i, c in enumerate(s.conc[f][:H])]
            if s.name == 'M':
                w = [int(c) if not slow or t >= s.closed[f][i] else 0 for i, c in enumerate(s.conc[f][:H])]
        peers = [d for d in s.ring(f)[:2] if s.inf[f][d] < w[d]]  # I, J: the peer's own W; K: learned
        if peers:
            return min(peers, key=lambda d: s.inf[f][d] / w[d])
        return UNIX if free >= 1 else None

    def pol_I(s, f, r, t):          # H with routes known: fast first in the hold queue, slow never queued in an app
        if r[2]:
            d = None if s.held[f] or s.held_slow[f] else s.room(f, True, t)
            if d is None:
                s.hold(f, r, t, s.held_slow[f])
                return
        else:
            d = None if s.held[f] else s.room(f, False, t)
            if d is None:
                s.hold(f, r, t, s.held[f])
                return
        s.go(f, r, d, t)

    pol_J = pol_K = pol_L = pol_M = pol_I           # J: slow-route requests leave the last local worker; K: learned concurrency

    def release(s, f, t):           # H, I, J: one of f's requests finished -> dispatch what f holds
        if s.name == 'H':
            while s.held[f]:
                d = s.slot(f)
                if d is None:
                    return
                s.send(f, s.held[f].popleft(), d, t)
            return
        while s.held[f]:
            d = s.room(f, False, t)
            if d is None:
                return
            s.go(f, s.held[f].popleft(), d, t)
        while s.held_slow[f]:
            d = s.room(f, True, t)
            if d is None:
                return
            s.go(f, s.held_slow[f].popleft(), d, t)


def pct(xs, p):
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000 if xs else float('nan')


def ms(x):
    return '–' if x != x else f'{x:.0f}' if x >= 10 else f'{x:.1f}'


def job(key):
    workload, law, policy, seed, accept, dur = key
    reqs = make_requests(workload, law, seed, dur)
    spec = WORKLOADS[workload]
    s = Sim(policy, accept, spec[2] if len(spec) > 2 else (W,) * H)
    s.means = {(fr, slow): MEANS[workload, fr][0 if slow else 1] for fr in range(H) for slow in (True, False)}
    s.run(reqs)
    assert not any(map(any, s.inf)) and not any(s.held) and not any(s.held_slow) and not any(s.load)
    lat = s.lat
    assert len(lat) == len(reqs)
    fast = sorted(l for l, slow, _ in lat if not slow)
    slow = sorted(l for l, slow, _ in lat if slow)
    left = sum(s.sent[f][d] for f in range(H) for d in range(H) if d != f)
    return dict(fp50=pct(fast, 50), fp99=pct(fast, 99), sp99=pct(slow, 99), fgt1s=100 * sum(l > 1 for l in fast) / max(1, len(fast)),
                ap99=pct(sorted(l for l, _, _ in lat), 99), gt1s=100 * sum(l > 1 for l, _, _ in lat) / len(lat),
                left=100 * left / len(reqs), eagain=s.eagain / dur, errors=len(reqs) - len(lat),
                over=[[s.sent[f][d] for d in s.ring(f)] for f in range(H)])   # per front: f+1, f+2, own TCP


def report(res, w, l, pols, seeds, dur):
    med = statistics.median
    get = lambda p, k: [res[w, l, p, sd][k] for sd in seeds]
    print(f'\n#### {w}, {l} service times ({dur:.0f} s; median of {len(seeds)} seeds, [min-max])\n')
    print('| policy | fast p50 | fast p99 [spread] | ×A, paired [spread] | slow p99 | all p99 | >1 s % '
          '| fast >1 s % | left host % | EAGAIN/s | errors |\n|---|---|---|---|---|---|---|---|---|---|---|')
    for p in pols:
        f99 = get(p, 'fp99')
        ratio = [a / b for a, b in zip(f99, get('A', 'fp99'))] if 'A' in pols else [float('nan')]
        print(f'| {p} | {ms(med(get(p, "fp50")))} | {ms(med(f99))} [{ms(min(f99))}-{ms(max(f99))}] '
              f'| {med(ratio):.2f} [{min(ratio):.2f}-{max(ratio):.2f}] | {ms(med(get(p, "sp99")))} '
              f'| {ms(med(get(p, "ap99")))} | {med(get(p, "gt1s")):.2f} | {med(get(p, "fgt1s")):.2f} | {med(get(p, "left")):.1f} '
              f'| {med(get(p, "eagain")):.2f} | {max(get(p, "errors"))} |')
    print('\nOverflow (requests not served through the front\'s own UNIX socket): rate, and its split '
          '→ next host / → host after / → own TCP port\n\n| policy | host1 front | host2 front | host3 front |'
          '\n|---|---|---|---|')
    for p in pols:
        cells = []
        for f in range(H):
            c = [med(o[f][k] for o in get(p, 'over')) for k in range(3)]
            n = sum(c)
            cells.append(f'{n / dur:.1f}/s: ' + ' / '.join(f'{100 * x / n:.0f}%' for x in c) if n else '0')
        print(f'| {p} | ' + ' | '.join(cells) + ' |')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('-w', '--workloads', default=','.join(WORKLOADS))
    ap.add_argument('-d', '--laws', default='exp,fixed', help='service-time law(s): exp, fixed')
    ap.add_argument('-p', '--policies', default=POLICIES)
    ap.add_argument('-s', '--seeds', type=int, default=5)
    ap.add_argument('--dur', type=float, default=300.0, help='simulated seconds of arrivals (then drain)')
    ap.add_argument('--accept', default='alt', choices=['alt', 'fifo'])
    ap.add_argument('-j', '--jobs', type=int, default=None, help='processes (default: all CPUs)')
    a = ap.parse_args()
    ws, ls, seeds = a.workloads.split(','), a.laws.split(','), range(1, a.seeds + 1)
    keys = [(w, l, p, sd) for w in ws for l in ls for p in a.policies for sd in seeds]
    with Pool(a.jobs) as pool:
        res = dict(zip(keys, pool.map(job, [k + (a.accept, a.dur) for k in keys], chunksize=1)))
    print(f'accept={a.accept}, W={W}, UNIX queue {UNIX_CAP}, hop {HOP * 1000:.1f} ms; times in ms')
    for w in ws:
        for l in ls:
            report(res, w, l, a.policies, seeds, a.dur)
    print(f'\n#### Key: fast p99 ms (×A paired median; seeds with ×A <= 0.3 of {len(seeds)})\n')
    print('| policy | ' + ' | '.join(f'{w} {l}' for w in ws for l in ls) + ' |\n|---|' + '---|' * (len(ws) * len(ls)))
    for p in a.policies:
        cells = []
        for w in ws:
            for l in ls:
                f99 = [res[w, l, p, sd]['fp99'] for sd in seeds]
                r = [x / res[w, l, 'A', sd]['fp99'] for x, sd in zip(f99, seeds)] if 'A' in a.policies else [0]
                cells.append(f'{ms(statistics.median(f99))} ({statistics.median(r):.2f}; {sum(x <= 0.3 for x in r)})')
        print(f'| {p} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main()
