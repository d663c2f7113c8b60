#!/usr/bin/env python3
"""The benchmark of issue 6 (run it through bench/run.sh, which sets up the
network namespace this runs in, and cleans up after it).

One persistent Nomad agent (tests/nomad-peer/agent.sh) with both drivers:
our `microvm` driver and `raw_exec` running a Skyflake-style job (the shape of
astro/skyflake's vm/nomad-job.nix: a prestart task making the tap, a poststop
task deleting it, a prestart sidecar task per virtiofs share, and the
`hypervisor` task whose shell runs `microvm-run &` and traps SIGCONT). Both
sides boot the same runners, made by tests/runner/make-runner.sh: one tap on
br0, one virtiofs share, 64 MiB, and qemu started with -S (CPU stopped: the
guest never runs, so 50 of them do not swamp 2 cores; see paused_variants).

  a. `nomad job run` -> VMM process running, both sides, interleaved.
  b. host memory per VM besides the VMM, N = 1, 10, 50 VMs at once.
  c. our StartTask broken down (the driver's `task started` log line), from
     the same starts as a.
  d. agent restart with N tasks running: agent start -> every task recovered.

Prints one table and writes it to bench/results.md with the machine, date and
commit. Every number in it comes from this run.
"""

import argparse
import collections
import concurrent.futures
import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

NOMAD_ADDR = "http://127.0.0.1:4646"
CLK_TCK = os.sysconf("SC_CLK_TCK")

args = None
nomad_bin = None
virtiofsd_bin = None
agent_dir = None
state_dir = None
work = None


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ------------------------------------------------------------------ processes


def run(cmd, check=True, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and out.returncode != 0:
        raise BenchError(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out


def nomad(*a, check=True):
    env = dict(os.environ, NOMAD_ADDR=NOMAD_ADDR, NOMAD_CLI_SHOW_HINTS="0")
    env.pop("NOMAD_TOKEN", None)
    return run([nomad_bin, *a], check=check, env=env)


def api(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(NOMAD_ADDR + path, data=data, method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read()
    return json.loads(text) if text else None


def agent_sh(*a):
    return run([os.path.join(args.repo, "tests/nomad-peer/agent.sh"), *a])


MY_NETNS = os.stat("/proc/self/ns/net").st_ino


class Proc:
    __slots__ = ("pid", "ppid", "pgrp", "start", "argv")

    def __init__(self, pid, ppid, pgrp, start, argv):
        self.pid, self.ppid, self.pgrp, self.start, self.argv = pid, ppid, pgrp, start, argv

    @property
    def arg0(self):
        return self.argv[0] if self.argv else ""


def read_proc(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2 :].split()
    if rest[0] == "Z":
        return None
    argv = [a.decode(errors="replace") for a in cmdline.split(b"\0")[:-1]]
    return Proc(pid, int(rest[1]), int(rest[2]), int(rest[19]), argv)


def procs_in_netns():
    """Every live process in our network namespace (where everything the
    bench starts runs), and their descendants wherever they are (virtiofsd's
    default sandbox moves it into namespaces of its own), by pid."""
    everything = {}
    inside = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        p = read_proc(int(name))
        if not p:
            continue
        everything[p.pid] = p
        try:
            if os.stat(f"/proc/{name}/ns/net").st_ino == MY_NETNS:
                inside.add(p.pid)
        except OSError:
            pass
    children = {}
    for p in everything.values():
        children.setdefault(p.ppid, []).append(p.pid)
    todo = list(inside)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in inside:
                inside.add(c)
                todo.append(c)
    return {pid: everything[pid] for pid in inside}


def mem_kib(pid):
    """(PSS, RSS) in KiB from smaps_rollup."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        return None
    return pss, rss


def agent_pid():
    with open(os.path.join(agent_dir, "agent.pid")) as f:
        return int(f.read().strip())


def boot_to_epoch():
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def proc_start_epoch(pid):
    p = read_proc(pid)
    return p.start / CLK_TCK + boot_to_epoch()


def classify(p, agent):
    """What a process in the namespace is, for the memory census."""
    a0 = os.path.basename(p.arg0)
    sub = p.argv[1] if len(p.argv) > 1 else ""
    if p.arg0.startswith("microvm@"):
        return "vmm"
    if p.pid == agent:
        return "agent"
    if a0 == "virtiofsd":
        return "virtiofsd"
    if a0 == "nomad-driver-microvm":
        if sub == "supervise":
            return "supervisor"
        if sub == "":
            return "plugin"
        return "driver-other"
    if p.arg0 == nomad_bin:
        if sub == "logmon":
            return "logmon"
        if sub == "executor":
            return "executor"
        return "nomad-cli"
    if any(x.endswith("/local/hypervisor.sh") for x in p.argv):
        return "wrapper"
    if p.pid == os.getpid() or p.ppid == os.getpid():
        return "bench"
    return "other"


def census():
    agent = agent_pid()
    groups = {}
    for p in procs_in_netns().values():
        groups.setdefault(classify(p, agent), []).append(p)
    return groups


def wait_for(what, limit, fn, interval=0.25):
    deadline = time.monotonic() + limit
    last = None
    while True:
        ok, last = fn()
        if ok:
            return last
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {limit:.0f} s waiting for {what}: {last}")
        time.sleep(interval)


# ------------------------------------------------------------------ runners


def make_runners(names):
    """Store runners from tests/runner/make-runner.sh (one tap, one share,
    64 MiB), then their paused variants. Returns {name: store path}."""
    out_dir = os.path.join(work, "runners")
    os.makedirs(out_dir, exist_ok=True)
    script = os.path.join(args.repo, "tests/runner/make-runner.sh")

    def build(name):
        tap = f"mvbt-{name[3:]}"
        r = run([script, out_dir, "--hostname", name, "--tap", tap, "--share", "data:data", "--mem", "64", "--store"])
        return name, r.stdout.strip().splitlines()[-1]

    # The first one alone: it puts kernel, initrd and virtiofsd into the store.
    built = dict([build(names[0])])
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        built.update(ex.map(build, names[1:]))
    return paused_variants(built)


def paused_variants(built):
    """A copy of each runner whose microvm-run passes -S (qemu starts with
    the CPU stopped) and whose microvm-shutdown sends QMP `quit` instead of
    Ctrl+Alt+Del (a stopped guest would never react), added to the store as
    is (its bin/virtiofsd-run still names the original's supervisord config,
    which the original's out-link keeps alive)."""
    vdir = os.path.join(work, "paused")
    roots = os.path.join(work, "roots")
    os.makedirs(roots, exist_ok=True)
    dirs = []
    for name, path in built.items():
        d = os.path.join(vdir, name, os.path.basename(path)[33:])  # strip the hash
        shutil.copytree(path, d, symlinks=True)
        for root, ds, fs in os.walk(d):
            for x in ds + fs:
                os.chmod(os.path.join(root, x), 0o755)
        run_sh = os.path.join(d, "bin/microvm-run")
        text = open(run_sh).read()
        if " -nodefaults " not in text:
            raise BenchError(f"unexpected microvm-run in {path}")
        open(run_sh, "w").write(text.replace(" -nodefaults ", " -S -nodefaults ", 1))
        sd = os.path.join(d, "bin/microvm-shutdown")
        text = open(sd).read()
        new = re.sub(r"^  echo '\{\"execute\":\"input-send-event\".*$", "  echo '{\"execute\":\"quit\"}'", text, flags=re.M)
        if new == text:
            raise BenchError(f"unexpected microvm-shutdown in {path}")
        open(sd, "w").write(new)
        dirs.append((name, d))
    out = run(["nix-store", "--add", *[d for _, d in dirs]]).stdout.split()
    paths = dict(zip([n for n, _ in dirs], out))
    for name, p in paths.items():
        run(["nix-store", "--realise", p, "--add-root", os.path.join(roots, name), "--indirect"])
    shutil.rmtree(vdir)
    return paths


# ------------------------------------------------------------------ jobs

# Both kinds of job: a failed start is a failed measurement, never retried.
NO_RETRY = """    restart {
      attempts = 0
      mode     = "fail"
    }
    reschedule {
      attempts  = 0
      unlimited = false
    }
"""


def ours_group(group, runner):
    return f"""
  group "{group}" {{
{NO_RETRY}    task "vm" {{
      driver       = "microvm"
      kill_timeout = "10s"
      config {{
        runner = "{runner}"
      }}
      resources {{
        cpu    = 60
        memory = 82
      }}
    }}
  }}
"""


def raw_group(group, runner, host):
    """Skyflake's per-VM group (vm/nomad-job.nix), with its scripts as they
    are apart from: /bin/bash for /run/current-system/sw/bin/bash, our
    virtiofsd's path, the bench's work dir for /run/microvms/..., small
    resources on the tap tasks (Nomad's defaults of 300 MiB each would not fit
    50 VMs on this node; resources are bookkeeping here) and kill_timeout 10s
    instead of 95s. Left out: the `copy-system` and `volume-dirs` prestart
    tasks (the runner is local and there are no volumes), which would only
    add to raw_exec's numbers."""
    tap = f"mvbt-{host[3:]}"
    wd = os.path.join(work, "rawvms", host)
    sock = f"{host}-virtiofs-data.sock"
    return f"""
  group "{group}" {{
{NO_RETRY}    task "add-interface-{tap}" {{
      lifecycle {{
        hook = "prestart"
      }}
      driver = "raw_exec"
      user   = "root"
      config {{
        command = "local/add-interface-{tap}.sh"
      }}
      template {{
        destination = "local/add-interface-{tap}.sh"
        perms       = "755"
        data        = <<EOD
#! /bin/bash -e

IFACE="{tap}"

if [ -d /sys/class/net/"$IFACE" ]; then
  echo "WARNING: Removing stale tap interface "$IFACE"" >&2
  ip tuntap del "$IFACE" mode tap || true
fi
ip tuntap add "$IFACE" mode tap user microvm
ip link set dev "$IFACE" master br0
ip link set "$IFACE" up
EOD
      }}
      resources {{
        cpu    = 10
        memory = 16
      }}
    }}
    task "delete-interface-{tap}" {{
      lifecycle {{
        hook = "poststop"
      }}
      driver = "raw_exec"
      user   = "root"
      config {{
        command = "local/delete-interface-{tap}.sh"
      }}
      template {{
        destination = "local/delete-interface-{tap}.sh"
        perms       = "755"
        data        = <<EOD
#! /bin/bash

IFACE="{tap}"

ip link set "$IFACE" down
ip tuntap del "$IFACE" mode tap
EOD
      }}
      resources {{
        cpu    = 10
        memory = 16
      }}
    }}
    task "virtiofsd-data" {{
      lifecycle {{
        hook    = "prestart"
        sidecar = true
      }}
      driver = "raw_exec"
      user   = "root"
      config {{
        command = "local/virtiofsd-data.sh"
      }}
      template {{
        destination = "local/virtiofsd-data.sh"
        perms       = "755"
        data        = <<EOD
#! /bin/bash -e

mkdir -p {wd}
chown microvm:kvm {wd}
cd {wd}

mkdir -p data
exec {virtiofsd_bin} \\
  --socket-path={sock} \\
  --socket-group=kvm \\
  --shared-dir=data \\
  --sandbox=none \\
  --thread-pool-size `nproc` \\
  --cache=always
EOD
      }}
      kill_timeout = "5s"
      resources {{
        memory = 10
        cpu    = 10
      }}
    }}
    task "hypervisor" {{
      driver = "raw_exec"
      user   = "microvm"
      config {{
        command = "local/hypervisor.sh"
      }}
      template {{
        destination = "local/hypervisor.sh"
        perms       = "755"
        data        = <<EOD
#! /bin/bash -e

mkdir -p {wd}
cd {wd}

# start hypervisor
{runner}/bin/microvm-run &

# stop hypervisor on signal
function handle_signal() {{
  echo "Received signal, shutting down" >&2
  date >&2
  {runner}/bin/microvm-shutdown
  echo "Done" >&2
  date >&2
  exit
}}
trap handle_signal CONT
wait
EOD
      }}
      leader       = true
      kill_signal  = "SIGCONT"
      kill_timeout = "10s"
      resources {{
        memory = 72
        cpu    = 50
      }}
    }}
  }}
"""


def job_hcl(name, side, vms):
    """vms: [(group, host, runner)]"""
    groups = "".join(
        ours_group(g, r) if side == "ours" else raw_group(g, r, h) for g, h, r in vms
    )
    return f'job "{name}" {{\n  datacenters = ["*"]\n  type        = "service"\n{groups}}}\n'


def write_job(name, side, vms):
    path = os.path.join(work, "jobs", f"{name}.nomad.hcl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(job_hcl(name, side, vms))
    return path


def allocs(job):
    return api("GET", f"/v1/job/{job}/allocations") or []


def main_task(side):
    return "vm" if side == "ours" else "hypervisor"


def check_failed(job):
    for a in allocs(job):
        if a["ClientStatus"] == "failed":
            events = []
            for t, st in (a.get("TaskStates") or {}).items():
                for e in st.get("Events") or []:
                    events.append(f"{t}: {e['Type']}: {e.get('DisplayMessage', '')}")
            raise BenchError(f"allocation {a['ID'][:8]} of {job} failed:\n" + "\n".join(events[-12:]))


def wait_all_running(job, side, n, limit):
    def fn():
        check_failed(job)
        al = [a for a in allocs(job) if a["DesiredStatus"] == "run"]
        running = [
            a for a in al if ((a.get("TaskStates") or {}).get(main_task(side)) or {}).get("State") == "running"
        ]
        return len(running) == n, f"{len(running)}/{n} allocations running"

    wait_for(f"{n} allocations of {job} to run", limit, fn)


def side_processes_gone(side):
    g = census()
    left = {k: len(v) for k, v in g.items() if k in ("vmm", "supervisor", "virtiofsd", "executor", "wrapper", "logmon")}
    left = {k: v for k, v in left.items() if v}
    taps = [t for t in os.listdir("/sys/class/net") if t.startswith("mvbt-")]
    tasks = os.listdir(os.path.join(state_dir, "tasks")) if os.path.isdir(os.path.join(state_dir, "tasks")) else []
    ok = not left and not taps and not tasks
    return ok, f"processes {left}, taps {taps}, task dirs {len(tasks)}"


def stop_job(job, side, limit=180):
    """`nomad job stop` (allocations stop in parallel; a purge would hand
    them to the client's GC, 2 at a time), wait until every process, tap and
    task dir of the job is gone, then purge it. Returns the ms from the stop
    until the server sees every allocation terminal."""
    t0 = time.monotonic()
    nomad("job", "stop", "-detach", job)

    def terminal():
        al = allocs(job)
        done = [a for a in al if a["ClientStatus"] in ("complete", "failed", "lost")]
        return len(done) == len(al), f"{len(done)}/{len(al)} allocations terminal"

    wait_for(f"the allocations of {job} to stop", limit, terminal, 0.02)
    ms = (time.monotonic() - t0) * 1000
    wait_for(f"{job} to be gone (processes, taps, task dirs)", limit, lambda: side_processes_gone(side), 0.1)
    nomad("job", "stop", "-purge", "-detach", job, check=False)
    return ms


# ------------------------------------------------------------------ agent log

TS_RE = re.compile(r"^\s*(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z \[(\w+)\]\s+(\S+): (.*)$")
KV_RE = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def log_offset():
    return os.path.getsize(os.path.join(agent_dir, "agent.log"))


def log_lines(offset):
    """(epoch, level, logger, message, {k: v}) of INFO+ lines after offset."""
    with open(os.path.join(agent_dir, "agent.log"), "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        m = TS_RE.match(line)
        if not m:
            continue
        ts = dt.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=dt.timezone.utc).timestamp()
        rest = m.group(4)
        msg, _, kv = rest.partition(": ")
        fields = {k: v.strip('"') for k, v in KV_RE.findall(kv)}
        out.append((ts, m.group(2), m.group(3), msg, fields))
    return out


# ------------------------------------------------------------------ stats


def pct(values, p):
    """Nearest-rank percentile."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = max(1, math.ceil(p / 100 * len(v)))
    return v[k - 1]


# ------------------------------------------------------------------ part a + c


def one_start(name, side, host, runner):
    """One job, one VM: ms from `nomad job run` to the VMM process, and our
    `task started` fields (ours). Raises Failed if the allocation fails."""
    path = write_job(name, side, [("g", host, runner)])
    off = log_offset()
    before = {int(x) for x in os.listdir("/proc") if x.isdigit()}
    needle = f"microvm@{host}".encode() + b"\0"
    t0 = time.monotonic()
    cli = subprocess.Popen(
        [nomad_bin, "job", "run", "-detach", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, NOMAD_ADDR=NOMAD_ADDR),
    )
    t_vmm = None
    deadline = t0 + 120
    while t_vmm is None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in before:
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read(len(needle)) == needle:
                        t = time.monotonic()
                        if os.stat(f"/proc/{entry}/ns/net").st_ino == MY_NETNS:
                            t_vmm = t
                            break
            except OSError:
                pass
        else:
            if time.monotonic() > deadline:
                check_failed(name)
                raise BenchError(f"{name}: no VMM after 120 s")
            time.sleep(0.005)
    out, _ = cli.communicate()
    if cli.returncode != 0:
        raise BenchError(f"nomad job run {name}: {out.decode()}")
    ms = (t_vmm - t0) * 1000
    wait_all_running(name, side, 1, 60)
    fields = None
    if side == "ours":
        alloc = allocs(name)[0]["ID"]

        def started():
            for _, _, _, msg, f in log_lines(off):
                if msg == "task started" and f.get("task_id", "").startswith(alloc):
                    return True, f
            return False, "no `task started` line yet"

        fields = wait_for(f"the `task started` line of {name}", 30, started)
    return ms, fields


def part_a(runner):
    samples = {"ours": [], "raw": []}
    starts = []  # parsed `task started` lines of our starts
    failed = {"ours": [], "raw": []}
    stops = {"ours": [], "raw": []}
    host = "mvba"
    for i in range(args.reps):
        order = ("ours", "raw") if i % 2 == 0 else ("raw", "ours")
        for side in order:
            for attempt in range(4):
                name = f"a-{side}-{i:02d}" + (f"-retry{attempt}" if attempt else "")
                try:
                    ms, fields = one_start(name, side, host, runner)
                except BenchError as e:
                    # A start that fails is reported, and the start is
                    # measured again (Skyflake's own job would retry too).
                    if attempt == 3 or "failed" not in str(e):
                        raise
                    log(f"a: {name}: {e}")
                    failed[side].append(str(e).splitlines()[-1])
                    stop_job(name, side)
                    continue
                break
            samples[side].append(ms)
            if fields:
                starts.append(fields)
            stop_ms = stop_job(name, side)
            stops[side].append(stop_ms)
            log(f"a: {name}: {ms:.0f} ms; stopped in {stop_ms:.0f} ms")
            time.sleep(0.5)
    return samples, starts, failed, stops


# ------------------------------------------------------------------ part b + d


def memory_census(side, n):
    g = census()
    want = {"vmm": n}
    if side == "ours":
        want["supervisor"] = n
    else:
        want["executor"] = 2 * n
        want["wrapper"] = n
    want["virtiofsd"] = n  # at least
    for k, v in want.items():
        if len(g.get(k, [])) != v and not (k == "virtiofsd" and len(g.get(k, [])) > v):
            raise BenchError(f"census of {side} with {n} VMs: {len(g.get(k, []))} {k} processes, expected {v}")
    res = {}
    for k, ps in g.items():
        pss = rss = 0
        for p in ps:
            m = mem_kib(p.pid)
            if m:
                pss += m[0]
                rss += m[1]
        res[k] = {"count": len(ps), "pss": pss, "rss": rss}
    others = [" ".join(p.argv)[:100] for p in g.get("other", [])]
    if others:
        log(f"b: uncounted processes in the namespace: {others}")
    return res


def ns_total_pss():
    """PSS of every process of the namespace but the VMMs and the bench's
    own (KiB): agent, plugin, logmons, executors, supervisors, virtiofsd …"""
    total = 0
    for k, ps in census().items():
        if k in ("vmm", "bench", "nomad-cli"):
            continue
        for p in ps:
            m = mem_kib(p.pid)
            if m:
                total += m[0]
    return total


def restart_agent():
    """Stops the agent (SIGTERM to its process group, as agent.sh does) and
    starts it again on the same data dir; returns (agent start epoch, log
    offset before the start)."""
    agent_sh("stop", agent_dir)
    off = log_offset()
    start_agent()
    t_agent = proc_start_epoch(agent_pid())
    # agent.sh returns once `node status` says ready, which the server still
    # says of the node before the new client has registered again; until it
    # has, nothing new is placed on it.
    wait_for(
        "the restarted client to register",
        120,
        lambda: (any(m == "node registration complete" for _, _, _, m, _ in log_lines(off)), "not yet"),
    )
    return t_agent, off


def start_agent():
    agent_sh(
        "start", agent_dir, "--plugin-dir", os.path.join(work, "plugins"), "--netns", args.netns,
        "--config", os.path.join(work, "extra.hcl"),
    )


def recovery(side, n, vmm_before):
    nomad("system", "gc", check=False)
    try:
        api("PUT", "/v1/client/gc")
    except Exception as e:  # noqa: BLE001 - best effort
        log(f"client gc: {e}")
    t_agent, off = restart_agent()
    lines = log_lines(off)
    started = [ts for ts, _, lg, msg, _ in lines if lg == "client" and msg == "started client"]
    if not started:
        raise BenchError("no `started client` line after the restart")
    rec = [ts for ts, _, _, msg, _ in lines if msg == "recovered task"]
    res = {"client_ms": (started[0] - t_agent) * 1000, "recovered": len(rec)}
    if rec:
        res["last_recovered_ms"] = (max(rec) - t_agent) * 1000
        res["span_ms"] = (max(rec) - min(rec)) * 1000
    errors = [f"{lg}: {msg}" for _, lvl, lg, msg, _ in lines if lvl == "ERROR" and "docker" not in lg]
    if errors:
        counted = collections.Counter(errors)
        log("d: errors logged during the restart: " + "; ".join(f"{k} ×{v}" for k, v in counted.items()))
    if n:
        # The same VMMs, still all there a moment later (nothing restarted).
        time.sleep(2)
        after = {p.pid for p in census().get("vmm", [])}
        if after != vmm_before:
            raise BenchError(f"{side}: VMMs changed across the agent restart: {sorted(vmm_before)} -> {sorted(after)}")
        if side == "ours" and len(rec) != n:
            raise BenchError(f"ours: {len(rec)} `recovered task` lines for {n} tasks")
    return res


def part_bd(runners):
    results = {}
    for n in args.sizes:
        for side in ("ours", "raw"):
            name = f"bd-{side}-{n}"
            vms = [(f"vm{i:02d}", f"mvb{i:02d}", runners[f"mvb{i:02d}"]) for i in range(1, n + 1)]
            path = write_job(name, side, vms)
            g0 = census()
            plugin0 = mem_kib(g0["plugin"][0].pid) if g0.get("plugin") else (0, 0)
            agent0 = mem_kib(agent_pid())
            ns0 = ns_total_pss()
            t0 = time.monotonic()
            nomad("job", "run", "-detach", path)
            wait_for(
                f"{n} VMMs of {name}",
                600,
                lambda: (len(census().get("vmm", [])) == n, f"{len(census().get('vmm', []))} VMMs"),
                0.05,
            )
            deploy_s = time.monotonic() - t0
            wait_all_running(name, side, n, 300)
            time.sleep(args.settle)
            mem = memory_census(side, n)
            g = census()
            plugin1 = mem_kib(g["plugin"][0].pid) if g.get("plugin") else (0, 0)
            agent1 = mem_kib(agent_pid())
            mem["plugin_growth"] = {"pss": plugin1[0] - plugin0[0], "rss": plugin1[1] - plugin0[1]}
            mem["agent_growth"] = {"pss": agent1[0] - agent0[0], "rss": agent1[1] - agent0[1]}
            mem["ns_delta"] = {"pss": ns_total_pss() - ns0, "rss": 0}
            log(f"b: {name}: {n} VMMs in {deploy_s:.1f} s; " + ", ".join(
                f"{k} {v['count'] if 'count' in v else ''} pss {v['pss']} KiB" for k, v in sorted(mem.items())))
            vmm_before = {p.pid for p in g.get("vmm", [])}
            rec = recovery(side, n, vmm_before)
            log(f"d: {name}: {rec}")
            results[(side, n)] = {"mem": mem, "deploy_s": deploy_s, "rec": rec}
            ms = stop_job(name, side, limit=300)
            log(f"{name}: all allocations stopped in {ms / 1000:.1f} s")
            results[(side, n)]["stop_s"] = ms / 1000
            nomad("system", "gc", check=False)
    return results


# ------------------------------------------------------------------ report


def mib(kib):
    return kib / 1024


def counted(mem, side):
    """Per-VM helper memory as the issue defines it (KiB, summed over the
    processes of all N VMs): ours = supervisors + virtiofsd + plugin growth;
    raw_exec = executors + hypervisor shells + virtiofsd."""
    def g(k, f="pss"):
        return mem.get(k, {}).get(f, 0)

    if side == "ours":
        keys = ["supervisor", "virtiofsd"]
    else:
        keys = ["executor", "wrapper", "virtiofsd"]
    res = {f: sum(g(k, f) for k in keys) for f in ("pss", "rss")}
    if side == "ours":
        # The plugin's own new memory: its RSS growth (its PSS falls as the
        # supervisors come to share its binary's pages, which their PSS
        # already accounts for).
        res = {f: v + g("plugin_growth", "rss") for f, v in res.items()}
    return res, keys


def machine():
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memtotal = next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1]
    deb = open("/etc/debian_version").read().strip() if os.path.exists("/etc/debian_version") else "?"
    return {
        "host": f"Debian {deb}, Linux {os.uname().release}, {os.cpu_count()} × {cpu}, {int(memtotal) // 1024 // 1024 + 1} GiB",
        "nomad": run([nomad_bin, "version"]).stdout.splitlines()[0],
        "qemu": run(["qemu-system-x86_64", "--version"]).stdout.splitlines()[0],
        "virtiofsd": run([virtiofsd_bin, "--version"]).stdout.strip().splitlines()[0],
    }


def commit():
    head = run(["git", "-C", args.repo, "rev-parse", "HEAD"]).stdout.strip()
    subject = run(["git", "-C", args.repo, "log", "-1", "--format=%s"]).stdout.strip()
    dirty = run(["git", "-C", args.repo, "status", "--porcelain", "--untracked-files=no"]).stdout.split("\n")
    dirty = sorted({l[3:] for l in dirty if l.strip()})
    return head, subject, dirty


def fmt_ms(v):
    return f"{v:.0f} ms" if v == v else "–"


def render(info, a, starts, bd, t_total):
    rows = []

    def row(part, what, ours, raw, target="", met=""):
        rows.append(f"| {part} | {what} | {ours} | {raw} | {target} | {met} |")

    reps = args.reps
    ao, ar = a["ours"], a["raw"]
    row("a", f"`nomad job run` → VMM process running, p50 ({reps} starts each)", fmt_ms(pct(ao, 50)), fmt_ms(pct(ar, 50)))
    row("a", "… p95", fmt_ms(pct(ao, 95)), fmt_ms(pct(ar, 95)))
    so, sr = info["a_stops"]["ours"], info["a_stops"]["raw"]
    row("(a′)", "not asked: `nomad job stop` → allocation complete, p50 / p95",
        f"{pct(so, 50):.0f} / {pct(so, 95):.0f} ms", f"{pct(sr, 50):.0f} / {pct(sr, 95):.0f} ms")
    for n in args.sizes:
        o, r = bd[("ours", n)], bd[("raw", n)]
        co, _ = counted(o["mem"], "ours")
        cr, _ = counted(r["mem"], "raw")
        ratio = co["pss"] / cr["pss"] if cr["pss"] else float("nan")
        row(
            "b", f"helper memory per VM besides the VMM (PSS), N = {n}",
            f"{mib(co['pss'] / n):.1f} MiB", f"{mib(cr['pss'] / n):.1f} MiB",
            "≤ 1/10 of raw_exec", f"{'yes' if ratio <= 0.1 else 'no'} ({ratio:.2f})",
        )
    if starts:
        for key, label in (("runner_ms", "runner check"), ("taps_ms", "taps"), ("virtiofsd_ms", "virtiofsd ready"),
                           ("exec_ms", "exec of microvm-run")):
            v = [float(s[key]) for s in starts]
            row("c", f"StartTask: {label}, p50 / p95", f"{pct(v, 50):.0f} / {pct(v, 95):.0f} ms", "", "", "")
        v = [float(s["total_ms"]) for s in starts]
        p50 = pct(v, 50)
        row("c", f"StartTask total, p50 / p95 ({len(starts)} starts)", f"{p50:.0f} / {pct(v, 95):.0f} ms", "",
            "p50 ≤ 50 ms", "yes" if p50 <= 50 else "no")
    for n in args.sizes:
        o, r = bd[("ours", n)]["rec"], bd[("raw", n)]["rec"]
        target, met = "", ""
        if n == 50:
            target = "50 tasks < 2 s"
            met = "yes" if o["client_ms"] < 2000 else "no"
        row("d", f"agent restart, N = {n}: agent start → every task recovered",
            fmt_ms(o["client_ms"]), fmt_ms(r["client_ms"]), target, met)
    table = [
        "| part | measure | microvm driver | raw_exec (Skyflake-style) | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]

    # Details
    det = ["| N | side | supervisors | executors | hypervisor shells | virtiofsd | plugin RSS growth | **counted** | counted, all RSS | Nomad logmons (not counted) | agent PSS change (not counted) | whole namespace but VMMs, PSS change | all N VMMs up in | all N stopped in |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in args.sizes:
        for side in ("ours", "raw"):
            m = bd[(side, n)]["mem"]
            c, _ = counted(m, side)

            def cell(k):
                x = m.get(k)
                if not x or not x.get("count"):
                    return "–"
                return f"{mib(x['pss'] / n):.2f} ({x['count']})"

            det.append(
                f"| {n} | {'microvm' if side == 'ours' else 'raw_exec'} | {cell('supervisor')} | "
                f"{cell('executor')} | {cell('wrapper')} | {cell('virtiofsd')} | "
                f"{mib(m['plugin_growth']['rss'] / n):.2f} | **{mib(c['pss'] / n):.2f}** | {mib(c['rss'] / n):.2f} | "
                f"{cell('logmon')} | {mib(m['agent_growth']['pss'] / n):.2f} | {mib(m['ns_delta']['pss'] / n):.2f} | "
                f"{bd[(side, n)]['deploy_s']:.1f} s | {bd[(side, n)]['stop_s']:.1f} s |"
            )
    rec = ["| N | side | agent start → `started client` (every RecoverTask returned) | agent start → last `recovered task` | first → last `recovered task` |",
           "| --- | --- | --- | --- | --- |"]
    rec.append(f"| 0 | (no tasks) | {fmt_ms(info['baseline_restart']['client_ms'])} | – | – |")
    for n in args.sizes:
        for side in ("ours", "raw"):
            r = bd[(side, n)]["rec"]
            rec.append(
                f"| {n} | {'microvm' if side == 'ours' else 'raw_exec'} | {fmt_ms(r['client_ms'])} | "
                f"{fmt_ms(r.get('last_recovered_ms', float('nan')))} | {fmt_ms(r.get('span_ms', float('nan')))} |"
            )
    cstarts = ["| start | runner | taps | supervisor (spawn → report) | of which virtiofsd ready | of which exec | total |",
               "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, s in enumerate(starts):
        cstarts.append(f"| {i + 1} | {s['runner_ms']} | {s['taps_ms']} | {s['supervisor_ms']} | {s['virtiofsd_ms']} | "
                       f"{s['exec_ms']} | {s['total_ms']} |")
    araw = ["| side | " + " | ".join(str(i + 1) for i in range(args.reps)) + " |",
            "| --- |" + " --- |" * args.reps,
            "| microvm | " + " | ".join(f"{v:.0f}" for v in ao) + " |",
            "| raw_exec | " + " | ".join(f"{v:.0f}" for v in ar) + " |",
            "| microvm, stop | " + " | ".join(f"{v:.0f}" for v in so) + " |",
            "| raw_exec, stop | " + " | ".join(f"{v:.0f}" for v in sr) + " |"]
    return table, det, rec, cstarts, araw


def notes(info):
    """Observations that depend on this run's numbers."""
    out = []
    so = info["a_stops"]["ours"]
    if so and pct(so, 50) > 3500:
        out.append(
            "- **a′, microvm stops wait about 4 s in Nomad's logmon.** After the VM is gone, the "
            "agent logs `logmon: timed out waiting for read-side of process output pipe to close` "
            "for the task: logmon's reader is still blocked opening the stdout/stderr FIFOs "
            "because the driver opens them for writing only when the VM writes something "
            "(`supervisor/logsink.rs`), which these stopped guests never do; logmon then waits "
            "its 2 s close tolerance twice (`client/logmon/logmon.go`). qemu's stderr is "
            "normally silent, so a booted guest's stop waits the same on the stderr FIFO. "
            "raw_exec's executor opens both FIFOs when it starts the task, so its stops do "
            "not wait."
        )
    if not out:
        return ""
    return "## Notes from this run\n\n" + "\n".join(out) + "\n\n"


def write_results(info, table, det, rec, cstarts, araw, t_total):
    head, subject, dirty = info["commit"]
    dirty_note = ""
    if dirty:
        dirty_note = f" (work tree had uncommitted changes in: {', '.join(f'`{d}`' for d in dirty)})"
    md = f"""# Benchmark results

Written by `bench/run.sh` ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(info['t_start']))},
{t_total / 60:.1f} min). Every number below is this run's own output.

- **Commit:** `{head}` — {subject}{dirty_note}
- **Machine:** {info['machine']['host']}; KVM unusable (nested), qemu runs under TCG
- **Load average** (other work on the machine) at start: {' '.join(info['load_start'])}; at end: {' '.join(info['load_end'])}
- **Software:** {info['machine']['nomad']}; {info['machine']['qemu']}; {info['machine']['virtiofsd']};
  the driver built with `cargo build --release`
- **Run:** `bench/run.sh --reps {args.reps} --sizes {','.join(map(str, args.sizes))}`

{chr(10).join(table)}

## What is measured, and how

Both sides run under one persistent Nomad agent (server + client, started by
`tests/nomad-peer/agent.sh` in the bench's own network namespace, bridge
`br0` 192.0.2.1/24) and boot the **same runners**:
`tests/runner/make-runner.sh --tap … --share data:data --mem 64 --store`,
copied with `-S` added to `microvm-run` (qemu starts with its CPU stopped, so
the guest never runs and 50 VMs do not swamp 2 cores) and `microvm-shutdown`
sending QMP `quit` (a stopped guest cannot react to Ctrl+Alt+Del). Guest boot
time is therefore in no number here. The driver is the release build.

The raw_exec side is Skyflake's per-VM job (`vm/nomad-job.nix` of
astro/skyflake): `add-interface-<tap>` (prestart: `ip tuntap add`, `master br0`,
up), `delete-interface-<tap>` (poststop), `virtiofsd-data` (prestart sidecar,
with Skyflake's own virtiofsd flags: `--sandbox=none --cache=always`), and
`hypervisor` (user `microvm`: a bash script that runs `microvm-run &`, traps
SIGCONT to run `microvm-shutdown`, and `wait`s), the scripts delivered by
`template` as Skyflake does. Left out: its `copy-system` and `volume-dirs`
prestart tasks (no-ops here), which would only add to raw_exec's numbers.

- **a.** Wall time from starting `nomad job run -detach job.hcl` (the CLI,
  in the agent's namespace) until a process whose argv[0] is
  `microvm@<host>` (qemu after `exec -a`) exists, polled in /proc every 5 ms.
  One single-VM job per start, the two sides interleaved. **a′** (not asked
  for, but it shows a driver problem, see below): `nomad job stop -detach`
  until the server has the allocation `complete`. Every job's processes, tap
  and task dir are gone before the next start.
- **b.** Per VM: summed over the processes of N VMs, divided by N, from
  `/proc/PID/smaps_rollup` ({args.settle:.0f} s after all N allocations run). **PSS**,
  so pages shared between processes (the nomad binary's in executors, logmons
  and the agent; ours in supervisors and the plugin) are split among them; RSS
  is shown too. **Counted** — microvm: the per-task supervisors
  (`nomad-driver-microvm supervise`), virtiofsd (the driver keeps virtiofsd's
  default `--sandbox=namespace`, which forks: 2 processes per share) and the
  plugin's RSS growth (with N VMs minus just before the job was submitted; its
  PSS *falls* as supervisors share its binary's pages, which their PSS already
  carries); raw_exec: the `nomad executor` processes (one per running task:
  the virtiofsd sidecar and the hypervisor task), the hypervisor task's bash
  script and virtiofsd (1 process). The tap tasks have no process once done.
  **Not counted**, in the details only: the VMM (qemu), Nomad's `logmon`
  (one per task whatever the driver: 1 per VM for microvm, 3 for raw_exec — the
  finished prestart task keeps its logmon), and the agent's change (Go heap:
  noisy). The "whole namespace" column is the change in the summed PSS of every
  process of the namespace except the VMMs (agent, plugin, logmons and all of
  the above): what N VMs cost the host beside their VMMs, all in.
- **c.** The driver's own `task started` log line, one per StartTask
  (`runner_ms taps_ms supervisor_ms virtiofsd_ms exec_ms total_ms`), from the
  {args.reps} starts of part a. `supervisor` runs from spawning the per-task
  supervisor until it reports the VMM started; virtiofsd ready (every share's
  socket is there) and exec are inside it; the rest of `total` is checks,
  claims, dirs, links and the GC root. Percentiles are nearest-rank.
- **d.** With the N VMs of part b running: `agent.sh stop` (SIGTERM to the
  agent's process group: agent, plugin, logmons; supervisors and executors
  live in groups of their own), then `agent.sh start` on the same data dir.
  Time from the new agent process's start (`/proc/PID/stat`) until the
  client's `started client` line, which Nomad logs once its restore loop has
  called RecoverTask for every task and each returned (the same signal for both
  drivers; raw_exec's reattach to its executors logs nothing when it works).
  The details add the last of our plugin's `recovered task` lines, and the
  same restart with no task at all: Nomad's own start-up (raft, fingerprints,
  plugin launch), which is in every row. Checked after each restart: the same
  VMM pids as before (nothing was restarted) and one `recovered task` per task.
  The run's log shows raw_exec's `failed to reattach to executor` once per VM:
  that is the finished `add-interface` prestart task, whose executor has
  exited (Nomad tries anyway); the VM's own tasks reattach.

{notes(info)}### b in detail (MiB per VM, PSS unless noted; process counts in parentheses)

{chr(10).join(det)}

### c: every start (ms)

{chr(10).join(cstarts)}

### d in detail

{chr(10).join(rec)}

### a: every start (ms)

{chr(10).join(araw)}

Starts whose allocation failed (then measured again): microvm {len(info['a_failed']['ours'])},
raw_exec {len(info['a_failed']['raw'])}{''.join(chr(10) + '- ' + m for m in info['a_failed']['ours'] + info['a_failed']['raw'])}
"""
    with open(args.out, "w") as f:
        f.write(md)


# ------------------------------------------------------------------ main


def main():
    global args, nomad_bin, virtiofsd_bin, agent_dir, state_dir, work
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--netns", required=True)
    ap.add_argument("--gcroots", required=True)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sizes", default="1,10,50")
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.out = args.out or os.path.join(args.repo, "bench/results.md")
    work = args.work
    t_start = time.time()
    info = {"t_start": t_start, "load_start": open("/proc/loadavg").read().split()[:3]}

    nomad_bin = run([os.path.join(args.repo, "tests/nomad-peer/build.sh")]).stdout.strip()
    virtiofsd_bin = run([os.path.join(args.repo, "tests/runner/install-virtiofsd.sh")]).stdout.strip()
    driver = os.path.join(args.repo, "target/release/nomad-driver-microvm")
    if not os.access(driver, os.X_OK):
        raise BenchError(f"{driver} is missing (cargo build --release)")
    info["machine"] = machine()
    info["commit"] = commit()

    hosts = ["mvba"] + [f"mvb{i:02d}" for i in range(1, max(args.sizes) + 1)]
    log(f"making {len(hosts)} runners")
    runners = make_runners(hosts)

    pdir = os.path.join(work, "plugins")
    os.makedirs(pdir)
    os.symlink(driver, os.path.join(pdir, "nomad-driver-microvm"))
    agent_dir = os.path.join(work, "agent")
    state_dir = os.path.join(work, "s")
    os.makedirs(os.path.join(work, "rawvms"))
    with open(os.path.join(work, "extra.hcl"), "w") as f:
        f.write(f"""plugin "nomad-driver-microvm" {{
  config {{
    state_dir      = "{state_dir}"
    default_bridge = "br0"
    virtiofsd      = "{virtiofsd_bin}"
    gcroots_dir    = "{args.gcroots}"
  }}
}}

client {{
  # keep terminal allocations from piling up GC work into the measurements
  gc_max_allocs = 300
}}
""")
    log("starting the agent")
    start_agent()
    info["baseline_restart"] = recovery("none", 0, set())
    log(f"d: restart with no tasks: {info['baseline_restart']}")

    a, starts, failed, stops = part_a(runners["mvba"])
    info["a_failed"] = failed
    info["a_stops"] = stops
    bd = part_bd(runners)
    info["load_end"] = open("/proc/loadavg").read().split()[:3]
    t_total = time.time() - t_start
    table, det, rec, cstarts, araw = render(info, a, starts, bd, t_total)
    write_results(info, table, det, rec, cstarts, araw, t_total)
    print("\n".join(table))
    print(f"\n(details and method: {args.out}; {t_total / 60:.1f} min)")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main()
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(1)
