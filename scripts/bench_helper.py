#!/usr/bin/env python3
"""The timed parts of scripts/bench: senders, readers, clients and clocks.

scripts/bench (bash) builds fifobind, finds socat, owns the temporary
directory and the cleanup trap, and calls this helper once per figure, tool
and run, alternating the tools. Each call sets up one pipeline, measures it,
tears it down and appends `figure tool value` lines to the results file;
`report` turns that file into the table. Standard library only.

What each figure measures is written in the header of scripts/bench.
"""

import fcntl
import os
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import time

MIB = 1 << 20
LINE = 64  # bytes per line, newline included
PIPE_CAPACITY = 1 << 20

ENV = os.environ
BIN = ENV.get("BENCH_BIN", "")
TMP = ENV.get("BENCH_TMP", "")
RESULTS = ENV.get("BENCH_RESULTS", "")
PIDS = os.path.join(TMP, "pids") if TMP else ""
SOCAT = ENV.get("BENCH_SOCAT", "socat")
TIMEOUT = float(ENV.get("BENCH_TIMEOUT", "60"))
PORT_LO, PORT_HI = 20000, 45000


class Broken(Exception):
    """Something did not work: the bench exits non-zero."""


def fifobind_dir():
    return ENV["FIFOBIND_DIR"]


# --------------------------------------------------------------- processes


def start_time(pid):
    """Field 22 of /proc/PID/stat, or None when there is no such process
    (or only its zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def remember(pid):
    """Records a process we started, for the bash trap's last sweep."""
    st = start_time(pid)
    if st is not None and PIDS:
        with open(PIDS, "a") as f:
            f.write(f"{pid} {st}\n")
    return (pid, st)


class Daemon:
    """A daemonized binding: not our child, so we watch it by PID and
    start time, never by PID alone."""

    def __init__(self, pid):
        self.pid, self.start = remember(pid)

    def alive(self):
        return self.start is not None and start_time(self.pid) == self.start

    def signal(self, sig):
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def wait_gone(self, limit=5.0):
        deadline = time.monotonic() + limit
        while self.alive():
            if time.monotonic() > deadline:
                self.signal(signal.SIGKILL)
                raise Broken(f"binding {self.pid} still alive {limit} s after SIGTERM")
            time.sleep(0.001)


class Procs:
    """Everything one measurement started; `close` ends it all."""

    def __init__(self):
        self.children = []
        self.daemons = []
        self.fds = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def popen(self, argv, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(argv, **kw)
        remember(p.pid)
        self.children.append(p)
        return p

    def binding(self, argv):
        """Runs a binding command; returns its Daemon once it is ready."""
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT)
        if r.returncode != 0:
            raise Broken(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.decode().strip()}")
        d = Daemon(int(r.stdout))
        self.daemons.append(d)
        return d

    def close(self):
        for d in self.daemons:
            d.signal(signal.SIGTERM)
        for p in self.children:
            if p.poll() is None:
                p.terminate()
        for p in self.children:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for d in self.daemons:
            d.wait_gone()
        for fd in self.fds:
            os.close(fd)
        self.children, self.daemons, self.fds = [], [], []


# ------------------------------------------------------------------- ports


def port_is_free(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


_used = set()


def free_port():
    """A port in 20000-45000 that nobody listens on now. Other test suites
    may share the machine, so callers retry when it is taken meanwhile."""
    for _ in range(1000):
        p = random.randint(PORT_LO, PORT_HI)
        if p not in _used and port_is_free(p):
            _used.add(p)
            return p
    raise Broken("no free port in 20000-45000")


def listening(port):
    """Whether something listens on 127.0.0.1:port (from /proc/net/tcp*)."""
    want = f":{port:04X}"
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for row in f:
                    cols = row.split()
                    if cols[3] == "0A" and cols[1].endswith(want):
                        return True
        except OSError:
            pass
    return False


def listening_ports():
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for row in f:
                    cols = row.split()
                    if cols[3] == "0A":
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


def wait_until(cond, what, limit=None, proc=None):
    deadline = time.monotonic() + (limit or TIMEOUT)
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise Broken(f"{what}: the process exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise Broken(f"timed out waiting for {what}")
        time.sleep(0.0005)


def listener():
    """A listening socket on a free port of 127.0.0.1: (socket, port)."""
    for _ in range(20):
        port = free_port()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        s.listen(8)
        s.settimeout(TIMEOUT)
        return s, port
    raise Broken("no free port to listen on")


# -------------------------------------------------------------- the relays


def fifo_path(tool, name):
    """fifobind's FIFO is its own; socat gets one made the same way
    (mkfifo, mode 0600) in a private directory of the same file system."""
    if tool == "fifobind":
        return os.path.join(fifobind_dir(), name)
    d = os.path.join(TMP, "socat")
    os.makedirs(d, mode=0o700, exist_ok=True)
    path = os.path.join(d, name)
    if os.path.exists(path):
        os.unlink(path)
    os.mkfifo(path, 0o600)
    return path


def socat_opts(tool):
    """socat runs with its defaults (an 8 KiB transfer buffer); tool
    `socat-b` is socat given fifobind's buffer size with -b, to show how
    much of a lead is only socat's small default buffer."""
    return ["-b", ENV.get("BENCH_SOCAT_BLOCK", "131072")] if tool == "socat-b" else []


def socat_in_argv(port, fifo, tool="socat"):
    return [SOCAT, *socat_opts(tool), "-u", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr", f"OPEN:{fifo}"]


def socat_out_argv(fifo, port, tool="socat"):
    return [SOCAT, *socat_opts(tool), "-u", f"OPEN:{fifo}", f"TCP:127.0.0.1:{port},nodelay"]


def start_bind_input(procs, name):
    """bind-input on a free port of 127.0.0.1; returns (port, Daemon,
    seconds the command took). Retries when somebody else took the port
    between our look and the binding's bind."""
    for attempt in range(5):
        port = free_port()
        argv = [f"{BIN}/bind-input", "--bind", "127.0.0.1", name, str(port)]
        t0 = time.monotonic()
        try:
            d = procs.binding(argv)
        except Broken:
            if attempt < 4 and not port_is_free(port):
                continue
            raise
        return port, d, time.monotonic() - t0
    raise Broken("could not start bind-input")


def start_socat_input(procs, fifo, tool="socat"):
    """socat listening on a free port of 127.0.0.1; returns (port, Popen)
    once it listens. Retries as above."""
    for attempt in range(5):
        port = free_port()
        p = procs.popen(socat_in_argv(port, fifo, tool))
        try:
            wait_until(lambda: listening(port), f"socat listening on {port}", proc=p)
        except Broken:
            if attempt < 4 and p.poll() is not None:
                continue
            raise
        return port, p
    raise Broken("could not start socat")


def start_input(procs, tool, name):
    """A listener that writes what arrives into a FIFO: (port, FIFO)."""
    if tool == "fifobind":
        port, _, _ = start_bind_input(procs, name)
        return port, fifo_path(tool, name)
    fifo = fifo_path(tool, name)
    port, _ = start_socat_input(procs, fifo, tool)
    return port, fifo


def start_output(procs, tool, name, port):
    """A relay from a FIFO to 127.0.0.1:port (where we listen). Returns the
    FIFO. For socat, the bench holds the FIFO open read-write itself, as
    bind-output does internally: socat's reader then never sees end-of-file
    when a writer closes, and opening the FIFO never blocks."""
    if tool == "fifobind":
        procs.binding([f"{BIN}/bind-output", name, "127.0.0.1", str(port)])
        return fifo_path(tool, name)
    fifo = fifo_path(tool, name)
    procs.fds.append(os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
    procs.popen(socat_out_argv(fifo, port, tool))
    return fifo


# ------------------------------------------------------------------ data


def block():
    """1 MiB of 64-byte lines; the throughput figures send it N times."""
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-"
    assert len(line) == LINE - 1
    return (line + b"\n") * (MIB // LINE)


def numbered(nbytes):
    """Distinct numbered lines, for the correctness check."""
    n = nbytes // LINE
    return b"".join(b"%020d" % i + b"." * (LINE - 21) + b"\n" for i in range(n))


def plain_pipe():
    """The limit's pipe, with the capacity bind-input gives its FIFO (1 MiB,
    the unprivileged maximum): with the default 64 KiB, the pipe itself is
    the bottleneck on a small VM (writer and reader wake each other every
    64 KiB) and would be slower than the relays it is meant to bound."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_CAPACITY)
    except OSError:
        pass
    return r, w


def write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def fork_writer(path_or_fd, chunks):
    """A child process writing `chunks` (bytes, repeated `count` times) to
    a FIFO or pipe; returns its PID."""
    data, count = chunks
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fd = path_or_fd if isinstance(path_or_fd, int) else os.open(path_or_fd, os.O_WRONLY)
            for _ in range(count):
                write_all(fd, data)
        except BaseException:
            code = 1
        os._exit(code)
    remember(pid)
    return pid


def wait_child(pid, what):
    if not wait_exit(pid, TIMEOUT):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise Broken(f"{what} timed out")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise Broken(f"{what} failed")


def recv_count(sock, total, keep=False):
    """Reads `total` bytes from a socket or fd; returns them if `keep`."""
    buf = bytearray(MIB)
    view = memoryview(buf)
    got, kept = 0, []
    is_sock = isinstance(sock, socket.socket)
    while got < total:
        n = sock.recv_into(view, min(MIB, total - got)) if is_sock else os.readv(sock, [view[: min(MIB, total - got)]])
        if n == 0:
            raise Broken(f"end of stream after {got} of {total} bytes")
        if keep:
            kept.append(bytes(view[:n]))
        got += n
    return b"".join(kept) if keep else None


# --------------------------------------------------------------- figures


def inbound(tool, nbytes, check=False):
    """Sender → TCP → relay → FIFO → head -c. Seconds, from connect to the
    reader's exit with all bytes."""
    data = numbered(nbytes) if check else block()
    count = 1 if check else nbytes // MIB
    sink = os.path.join(TMP, "inbound.out")
    with Procs() as procs, open(sink if check else os.devnull, "wb") as out:
        if tool == "pipe":
            r, w = plain_pipe()
            head = procs.popen(["head", "-c", str(nbytes)], stdin=r, stdout=out)
            os.close(r)
            t0 = time.monotonic()
            pid = fork_writer(w, (data, count))
            os.close(w)
            wait_proc(head, f"inbound {tool}: the reader")
            t1 = time.monotonic()
            wait_child(pid, "pipe writer")
        else:
            port, fifo = start_input(procs, tool, "bin")
            head = procs.popen(["head", "-c", str(nbytes), fifo], stdout=out)
            t0 = time.monotonic()
            s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            for _ in range(count):
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            wait_proc(head, f"inbound {tool}: the reader")
            t1 = time.monotonic()
            s.close()
    if check:
        with open(sink, "rb") as f:
            got = f.read()
        os.unlink(sink)
        if got != data:
            raise Broken(f"inbound {tool}: the reader got {len(got)} bytes, not the {len(data)} sent, in order")
    return t1 - t0


def wait_exit(pid, limit):
    """Blocks until child `pid` exits, at most `limit` seconds; returns
    whether it did. A pidfd wakes us the moment it exits (Popen.wait with a
    timeout polls with sleeps of up to 50 ms, too coarse for a clock)."""
    fd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(int(limit * 1000)))
    finally:
        os.close(fd)


def wait_proc(p, what):
    if not wait_exit(p.pid, TIMEOUT):
        raise Broken(f"{what} did not finish within {TIMEOUT:.0f} s")
    p.wait()
    if p.returncode != 0:
        raise Broken(f"{what} exited {p.returncode}")


def outbound(tool, nbytes, check=False):
    """Writer → FIFO → relay → TCP → reader. Seconds, from the writer's
    start to the reader's last byte."""
    data = numbered(nbytes) if check else block()
    count = 1 if check else nbytes // MIB
    with Procs() as procs:
        if tool == "pipe":
            r, w = plain_pipe()
            t0 = time.monotonic()
            pid = fork_writer(w, (data, count))
            os.close(w)
            got = recv_count(r, nbytes, keep=check)
            t1 = time.monotonic()
            os.close(r)
            wait_child(pid, "pipe writer")
        else:
            lsock, port = listener()
            fifo = start_output(procs, tool, "bout", port)
            conn, _ = lsock.accept()
            lsock.close()
            conn.settimeout(TIMEOUT)
            t0 = time.monotonic()
            pid = fork_writer(fifo, (data, count))
            got = recv_count(conn, nbytes, keep=check)
            t1 = time.monotonic()
            wait_child(pid, "FIFO writer")
            conn.close()
    if check and got != data:
        raise Broken(f"outbound {tool}: the reader got other bytes than were written")
    return t1 - t0


LOOP = 'while IFS= read -r line; do echo "$line" > "$2"; done < "$1"'


def latency(tool, lines, warmup=50):
    """Client → TCP → input relay → FIFO → bash `while read` loop → FIFO →
    output relay → TCP → client, one line in flight at a time. Returns the
    round-trip times in microseconds."""
    with Procs() as procs:
        lsock, oport = listener()
        ofifo = start_output(procs, tool, "lout", oport)
        back, _ = lsock.accept()
        lsock.close()
        back.settimeout(TIMEOUT)
        iport, ififo = start_input(procs, tool, "lin")
        procs.popen(["bash", "-c", LOOP, "loop", ififo, ofifo])
        s = socket.create_connection(("127.0.0.1", iport), timeout=TIMEOUT)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = b""
        rtts = []
        for i in range(warmup + lines):
            msg = b"%020d" % i + b"." * (LINE - 21) + b"\n"
            t0 = time.perf_counter_ns()
            s.sendall(msg)
            while b"\n" not in pending:
                chunk = back.recv(4096)
                if not chunk:
                    raise Broken(f"latency {tool}: the echo connection closed")
                pending += chunk
            t1 = time.perf_counter_ns()
            got, pending = pending.split(b"\n", 1)
            if got + b"\n" != msg or pending:
                raise Broken(f"latency {tool}: sent line {i}, got {got[:30]!r}")
            if i >= warmup:
                rtts.append((t1 - t0) / 1000)
        s.close()
        back.close()
    return rtts


def readiness(tool, n):
    """Milliseconds from starting the command to a listener that accepts:
    for bind-input, until the command returns (it returns only once
    ready, and a connect then succeeds at once); for socat, until a
    connect to its port succeeds (probed every 0.1 ms)."""
    times = []
    for _ in range(n):
        with Procs() as procs:
            if tool == "fifobind":
                port, _, secs = start_bind_input(procs, "ready")
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            elif tool == "spawn":
                t0 = time.monotonic()
                subprocess.run(["true"], stdout=subprocess.PIPE, check=True)
                secs = time.monotonic() - t0
            else:
                secs = socat_ready(procs, fifo_path(tool, "ready"))
        times.append(secs * 1000)
    return times


def socat_ready(procs, fifo):
    for attempt in range(5):
        port = free_port()
        t0 = time.monotonic()
        p = procs.popen(socat_in_argv(port, fifo))
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return time.monotonic() - t0
            except ConnectionRefusedError:
                if p.poll() is not None:
                    break
                if time.monotonic() - t0 > TIMEOUT:
                    raise Broken(f"socat did not listen on {port}")
                time.sleep(0.0001)
    raise Broken("could not start socat")


def memory(pid):
    """VmRSS and Pss of a process, in KiB."""
    rss = pss = None
    with open(f"/proc/{pid}/status") as f:
        for row in f:
            if row.startswith("VmRSS:"):
                rss = int(row.split()[1])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for row in f:
                if row.startswith("Pss:"):
                    pss = int(row.split()[1])
    except OSError:
        pass
    return rss, pss


def footprint(tool):
    """Memory of an idle listener (bind-input; socat TCP-LISTEN … OPEN:fifo)
    and of an idle connected sender (bind-output; socat OPEN:fifo TCP:…),
    each measured 200 ms after it is ready."""
    with Procs() as procs:
        if tool == "fifobind":
            listener_pid = start_bind_input(procs, "idle")[1].pid
        else:
            listener_pid = start_socat_input(procs, fifo_path(tool, "idle"))[1].pid
        lsock, oport = listener()
        start_output(procs, tool, "idleout", oport)
        conn, _ = lsock.accept()
        lsock.close()
        sender_pid = procs.daemons[-1].pid if tool == "fifobind" else procs.children[-1].pid
        time.sleep(0.2)
        result = memory(listener_pid) + memory(sender_pid)
        conn.close()
    return result


def scale(tool, n):
    """Starts n listeners (fifobind: one after the other, each command
    returning once ready, as `pid=$(bind-input …)` in a loop; socat: all
    launched with `&`, then waited for until every port listens), then
    SIGTERM to all and waits until every process is gone. Returns (up
    seconds, down seconds, what was left behind)."""
    ports = []
    procs = Procs()
    if tool == "fifobind":
        # A fresh runtime directory, so that every run starts from the same
        # state (no logs or recently deleted files of earlier figures).
        ENV["FIFOBIND_DIR"] = os.path.join(TMP, f"scale.{os.getpid()}")
    try:
        t0 = time.monotonic()
        if tool == "fifobind":
            for i in range(n):
                ports.append(start_bind_input(procs, f"s{i}")[0])
        else:
            while len(ports) < n:
                ports.append(free_port())
            for i, port in enumerate(ports):
                procs.popen(socat_in_argv(port, fifo_path(tool, f"s{i}")))
            want = set(ports)
            retries = [0]

            def all_listen():
                for k, p in enumerate(procs.children):
                    if p.poll() is None:
                        continue
                    # Another program took the port between our look and
                    # socat's bind: start this one again on another port.
                    if p.returncode == 0 or port_is_free(ports[k]) or retries[0] >= 20:
                        raise Broken(f"a socat listener exited ({p.returncode})")
                    retries[0] += 1
                    want.discard(ports[k])
                    ports[k] = free_port()
                    want.add(ports[k])
                    procs.children[k] = procs.popen(socat_in_argv(ports[k], fifo_path(tool, f"s{k}")))
                    procs.children.pop()
                return want <= listening_ports()

            wait_until(all_listen, f"{n} socat listeners")
        t1 = time.monotonic()
        if tool == "fifobind":
            for d in procs.daemons:
                d.signal(signal.SIGTERM)
            deadline = time.monotonic() + TIMEOUT
            left = procs.daemons
            while left and time.monotonic() < deadline:
                left = [d for d in left if d.alive()]
                if left:
                    time.sleep(0.001)
        else:
            for p in procs.children:
                p.terminate()
            for p in procs.children:
                p.wait(timeout=TIMEOUT)
            left = [p for p in procs.children if p.poll() is None]
        t2 = time.monotonic()
        remains = []
        if left:
            remains.append(f"{len(left)} processes")
        busy = set(ports) & listening_ports()
        if busy:
            remains.append(f"{len(busy)} ports still listening")
        if tool == "fifobind":
            names = [e for e in os.listdir(fifobind_dir()) if not e.endswith(".log")]
            if names:
                remains.append(f"{len(names)} FIFOs/claims in the runtime directory")
            procs.daemons = []
        else:
            procs.children = []
        return t1 - t0, t2 - t1, ", ".join(remains)
    finally:
        procs.close()


# ------------------------------------------------------------------ report


def record(figure, tool, *values):
    with open(RESULTS, "a") as f:
        for v in values:
            f.write(f"{figure} {tool} {v}\n")


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def load():
    data = {}
    with open(RESULTS) as f:
        for row in f:
            fig, tool, v = row.split()
            data.setdefault((fig, tool), []).append(float(v))
    return data


def report():
    data = load()

    def med(fig, tool):
        vals = data.get((fig, tool))
        return statistics.median(vals) if vals else None

    rows = []

    def row(name, fb, other, other_name, ratio, fmt, target="", ok=None):
        if fb is None or other is None:
            return
        verdict = "" if ok is None else ("ok" if ok else "MISSED")
        rows.append((name, fmt(fb), f"{fmt(other)} {other_name}", ratio, target, verdict))

    f0 = lambda x: f"{x:.0f}"
    f2 = lambda x: f"{x:.2f}"
    mib = float(ENV.get("BENCH_MIB", "256"))
    block = ENV.get("BENCH_SOCAT_BLOCK", "131072")
    for d in ("inbound", "outbound"):
        fb, so, sb, pi = ((mib / med(d, t) if med(d, t) else None) for t in ("fifobind", "socat", "socat-b", "pipe"))
        if fb and so:
            row(f"{d} throughput, MiB/s", fb, so, "socat", f"{fb / so:.2f}x", f0, ">= 1.2x (aim 1.5x)", fb / so >= 1.2)
        if fb and pi:
            row(f"{d} vs plain pipe, MiB/s", fb, pi, "pipe", f"{100 * fb / pi:.0f}%", f0, ">= 60%", fb / pi >= 0.6)
        if fb and sb:
            row(f"{d} vs socat -b {block}, MiB/s", fb, sb, "socat-b", f"{fb / sb:.2f}x", f0)
    for q in ("p50", "p99"):
        fb, so = med(f"rtt-{q}", "fifobind"), med(f"rtt-{q}", "socat")
        if fb and so:
            if q == "p99":
                row(f"round trip {q}, us", fb, so, "socat", f"{fb / so:.2f}x", f0, "<= socat", fb <= so)
            else:
                row(f"round trip {q}, us", fb, so, "socat", f"{fb / so:.2f}x", f0)
    fb, so, sp = med("ready", "fifobind"), med("ready", "socat"), med("ready", "spawn")
    if fb and so:
        row("readiness median, ms", fb, so, "socat", f"{fb / so:.2f}x", f2, "< 5 ms", fb < 5)
    if fb and sp:
        row("readiness vs spawning true(1), ms", fb, sp, "true", f"{fb / sp:.1f}x", f2)
    for fig, what, target in (
        ("rss-in", "idle RSS, listener, KiB", True),
        ("pss-in", "idle PSS, listener, KiB", False),
        ("rss-out", "idle RSS, connected sender, KiB", False),
        ("pss-out", "idle PSS, connected sender, KiB", False),
    ):
        fb, so = med(fig, "fifobind"), med(fig, "socat")
        if fb and so:
            if target:
                row(what, fb, so, "socat", f"{fb / so:.2f}x", f0, "<= socat", fb <= so)
            else:
                row(what, fb, so, "socat", f"{fb / so:.2f}x", f0)
    n = ENV.get("BENCH_SCALE", "500")
    for fig, what, limit in (("scale-up", f"{n} bindings up, s", 3), ("scale-down", f"{n} bindings down, s", 2)):
        fb, so = med(fig, "fifobind"), med(fig, "socat")
        if fb and so:
            target = f"< {limit} s" if n == "500" else ""
            row(what, fb, so, "socat", f"{fb / so:.2f}x", f2, target, (fb < limit) if target else None)

    head = ("figure", "fifobind", "socat or limit", "ratio", "target", "")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(6)]

    def line(r):
        cells = (str(c).ljust(w) if i in (0, 4, 5) else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return "  ".join(cells).rstrip()

    print(line(head))
    print(line(tuple("-" * w for w in widths)))
    for r in rows:
        print(line(r))
    print()
    print("samples (seconds for inbound/outbound/scale, us for rtt, ms for ready, KiB for memory):")
    for fig in sorted({k[0] for k in data}):
        parts = []
        for tool in ("fifobind", "socat", "socat-b", "pipe", "spawn"):
            vals = data.get((fig, tool))
            if not vals:
                continue
            if len(vals) > 10:
                q = statistics.quantiles(vals, n=4)
                parts.append(f"{tool}: n={len(vals)} quartiles {q[0]:.3g} {q[1]:.3g} {q[2]:.3g}")
            else:
                parts.append(f"{tool}: " + " ".join(f"{v:.4g}" for v in vals))
        print(f"  {fig:10} " + " | ".join(parts))


# -------------------------------------------------------------------- main


def main(argv):
    cmd = argv[1]
    mib = int(ENV.get("BENCH_MIB", "256"))
    if cmd == "check":
        # A few MiB of numbered lines through each pipeline, compared byte
        # for byte; and a short round trip. Catches a broken pipeline before
        # its speed is believed.
        n = int(ENV.get("BENCH_CHECK_MIB", "4")) * MIB
        for tool in ("fifobind", "socat", "pipe"):
            inbound(tool, n, check=True)
            outbound(tool, n, check=True)
        for tool in ("fifobind", "socat"):
            latency(tool, 20, warmup=0)
        print("check: inbound, outbound and round trip deliver every line, in order")
    elif cmd == "inbound" or cmd == "outbound":
        tool = argv[2]
        secs = (inbound if cmd == "inbound" else outbound)(tool, mib * MIB)
        record(cmd, tool, f"{secs:.6f}")
        print(f"{cmd:9} {tool:8} {mib / secs:8.0f} MiB/s")
    elif cmd == "latency":
        tool = argv[2]
        rtts = latency(tool, int(ENV.get("BENCH_LINES", "2000")))
        p50, p99 = pct(rtts, 0.50), pct(rtts, 0.99)
        record("rtt-p50", tool, f"{p50:.1f}")
        record("rtt-p99", tool, f"{p99:.1f}")
        print(f"latency   {tool:8} p50 {p50:7.0f} us  p99 {p99:7.0f} us  ({len(rtts)} lines)")
    elif cmd == "ready":
        tool = argv[2]
        times = readiness(tool, int(ENV.get("BENCH_READY", "20")))
        record("ready", tool, *(f"{t:.3f}" for t in times))
        print(f"ready     {tool:8} median {statistics.median(times):6.2f} ms  ({len(times)} starts)")
    elif cmd == "footprint":
        tool = argv[2]
        rss_in, pss_in, rss_out, pss_out = footprint(tool)
        record("rss-in", tool, rss_in)
        record("rss-out", tool, rss_out)
        if pss_in is not None:
            record("pss-in", tool, pss_in)
            record("pss-out", tool, pss_out)
        print(f"footprint {tool:8} listener RSS {rss_in} KiB PSS {pss_in} KiB; sender RSS {rss_out} KiB PSS {pss_out} KiB")
    elif cmd == "scale":
        tool = argv[2]
        n = int(ENV.get("BENCH_SCALE", "500"))
        up, down, remains = scale(tool, n)
        record("scale-up", tool, f"{up:.4f}")
        record("scale-down", tool, f"{down:.4f}")
        print(f"scale     {tool:8} {n} up {up:.2f} s, down {down:.2f} s, {'all gone' if not remains else 'LEFT: ' + remains}")
        if remains:
            raise Broken(f"after stopping {n} {tool} listeners: {remains} left")
    elif cmd == "report":
        report()
    else:
        raise SystemExit(f"bench_helper: unknown command {cmd}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main(sys.argv)
    except Broken as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        # Cleaned up on the way out; now die by the signal, so that bash
        # sees an interrupted child and stops too.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
