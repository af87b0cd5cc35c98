# Times `BIN --version` N times (wall, max RSS) for each binary given, alternating.
import resource, subprocess, sys, time, statistics
bins = sys.argv[2:]
n = int(sys.argv[1])
walls = {b: [] for b in bins}
rss = {b: [] for b in bins}
for _ in range(n):
    for b in bins:
        t = time.perf_counter()
        p = subprocess.Popen([b, "--version"], stdout=subprocess.DEVNULL)
        _, status, usage = __import__("os").wait4(p.pid, 0)
        walls[b].append(time.perf_counter() - t)
        rss[b].append(usage.ru_maxrss / 1024)
        assert status == 0, b
for b in bins:
    w = sorted(walls[b])
    print(f"{b}: --version wall min/median/max {w[0]*1000:.1f}/{statistics.median(w)*1000:.1f}/{w[-1]*1000:.1f} ms, max RSS median {statistics.median(rss[b]):.0f} MB ({n} runs)")
