#!/usr/bin/env python3
"""Push benchmark: stackclone against rsync over ssh, rclone over sftp and `cp -a`, in one run.

Called by bench/push/run.sh, which installs the tools and builds the release binaries first.
See the "Push" section of bench/README.md for what is measured and how.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # keep bench/push free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset import Dataset  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SSH_PORT = 2222
NFT_TABLE = "stackclone_bench_push"
# --link lan|wan: everything runs in this network namespace, through stackclone-bench-linkem.
NETNS = "stackclone-bench-push"
SSH_PROXY_PORT = 2223  # the ssh clients dial the proxy here; it forwards to sshd on SSH_PORT
# Round trip (half each way), rate of each direction (IP bytes), share of datagrams lost.
LINKS = {
    "loopback": None,
    "lan": {"rtt_ms": 1.0, "rate_mbit": 1000.0, "loss": 0.0},
    "wan": {"rtt_ms": 40.0, "rate_mbit": 100.0, "loss": 0.001},
}
MIB = 1024 * 1024
TOOLS = ["stackclone", "stackclone-precopy", "rsync", "rclone", "cp"]
SCENARIOS = ["first", "nochange", "changed"]
SCEN_TITLE = {"first": "first copy", "nochange": "no-change re-sync", "changed": "1 % changed"}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Bench:
    def __init__(self, a):
        self.a = a
        self.w = os.path.abspath(a.dir)
        self.bin = os.path.join(self.w, "bin")
        self.data = os.path.join(self.w, "data")
        self.tgt = os.path.join(self.w, "tgt")
        self.sc = os.path.join(self.w, "sc")
        self.ssh = os.path.join(self.w, "ssh")
        self.logs = os.path.join(self.w, "logs")
        self.tmp = os.path.join(self.w, "tmp")
        self.results_path = os.path.join(self.w, "results.jsonl")
        self.quic_port = a.quic_port
        self.link = LINKS[a.link]
        if self.link:  # --link-rtt-ms etc. override one value of the profile
            self.link = dict(self.link)
            for k in ("rtt_ms", "rate_mbit", "loss"):
                if getattr(a, "link_" + k) is not None:
                    self.link[k] = getattr(a, "link_" + k)
        # Without a link profile the clients dial the servers; with one, the proxy.
        self.quic_client_port = a.quic_port + 1 if self.link else a.quic_port
        self.ssh_client_port = SSH_PROXY_PORT if self.link else SSH_PORT
        self.ns = []  # command prefix that runs a network client or server in the namespace
        self.netns = False
        self.linkem = None
        self.link_check = None
        self.sshd = None
        self.nft = False
        self.nft_family = "inet"
        self.records = []
        self.meta = {}
        self.verify_results = {}
        self.notes = []  # anomalies seen during the run, for the report

    # ---- set-up -------------------------------------------------------------------------
    def setup(self):
        for d in (self.w, self.bin, self.data, self.tgt, self.sc, self.ssh, self.logs, self.tmp):
            os.makedirs(d, exist_ok=True)
        # A snapshot of the binaries: others may rebuild target/release during the run.
        for b in ("stackclone-source", "stackclone-target", "stackclone-certs") + (
                ("stackclone-bench-linkem",) if self.link else ()):
            shutil.copy2(os.path.join(self.a.target_dir, b), os.path.join(self.bin, b))
        if self.link:
            self.setup_netns()
            self.setup_linkem()
        self.setup_ssh()
        self.setup_rclone()
        self.setup_stackclone()
        self.setup_nft()
        if self.link:
            self.check_link()

    # ---- shaped link (--link lan|wan) ----------------------------------------------------
    def setup_netns(self):
        """A network namespace with only `lo`, MTU 1500 like Ethernet, segmentation offloads
        off so every packet nft counts is one a 1500-byte link would carry."""
        remove_netns()  # one left by a run that was killed with SIGKILL
        sh(["ip", "netns", "add", NETNS])
        self.netns = True
        self.ns = ["ip", "netns", "exec", NETNS]
        sh(["ip", "-n", NETNS, "link", "set", "lo", "mtu", "1500", "up"])
        r = subprocess.run(self.ns + ["ethtool", "-K", "lo", "tso", "off", "gso", "off"],
                           capture_output=True)
        if r.returncode != 0:
            self.notes.append("could not turn TSO/GSO off on the namespace's lo "
                              f"({r.stderr.decode().strip()}); TCP wire bytes miss some headers")
        log(f"network namespace {NETNS}: lo up, MTU 1500")

    def setup_linkem(self):
        l = self.link
        self.linkem_log = open(os.path.join(self.logs, "linkem.log"), "ab")
        cmd = self.ns + [os.path.join(self.bin, "stackclone-bench-linkem"), "proxy",
                         "--rtt-ms", str(l["rtt_ms"]), "--rate-mbit", str(l["rate_mbit"]),
                         "--loss", str(l["loss"]), "--seed", str(self.a.seed),
                         "--udp", f"127.0.0.1:{self.quic_client_port}=127.0.0.1:{self.quic_port}",
                         "--tcp", f"127.0.0.1:{self.ssh_client_port}=127.0.0.1:{SSH_PORT}"]
        self.linkem = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.linkem_log)
        line = self.linkem.stdout.readline()
        if b"linkem ready" not in line:
            raise RuntimeError(f"linkem did not start (exit {self.linkem.poll()}); see logs/linkem.log")
        log(f"linkem ({self.a.link}: RTT {l['rtt_ms']} ms, {l['rate_mbit']:.0f} Mbit/s each way, "
            f"{l['loss'] * 100:g} % datagram loss): udp/{self.quic_client_port} -> udp/{self.quic_port}, "
            f"tcp/{self.ssh_client_port} -> tcp/{SSH_PORT} (pid {self.linkem.pid})")

    def check_link(self):
        """Round trips and bulk rates through the same proxy code with the same shape, on
        loopback in the namespace: the report shows what the link really was."""
        l = self.link
        out = subprocess.run(self.ns + [os.path.join(self.bin, "stackclone-bench-linkem"), "selftest",
                                        "--rtt-ms", str(l["rtt_ms"]), "--rate-mbit", str(l["rate_mbit"]),
                                        "--loss", str(l["loss"]), "--secs", "1"],
                             capture_output=True, check=True, text=True).stdout
        c = json.loads(out)
        self.link_check = c
        log(f"link check: UDP RTT {c['udp_rtt_ms']['median']:.2f} ms, TCP RTT {c['tcp_rtt_ms']['median']:.2f} ms "
            f"(median of {c['udp_rtt_ms']['n']}), bulk TCP {c['tcp_bulk']['mbit_s_ip']:.0f} Mbit/s, "
            f"UDP {c['udp_bulk']['mbit_s_ip']:.0f} Mbit/s (IP bytes)")

    def udp_errors(self):
        """The namespace's UDP receive-buffer drops (a proxy or agent that fell behind)."""
        try:
            out = subprocess.run(self.ns + ["cat", "/proc/net/snmp"], capture_output=True, text=True).stdout
            rows = [line.split() for line in out.splitlines() if line.startswith("Udp:")]
            return int(dict(zip(rows[0][1:], rows[1][1:]))["RcvbufErrors"])
        except (OSError, IndexError, KeyError, ValueError):
            return None

    def setup_ssh(self):
        s = self.ssh
        for key in ("host_ed25519", "id_ed25519"):
            if not os.path.exists(os.path.join(s, key)):
                sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "stackclone-bench",
                    "-f", os.path.join(s, key)])
        shutil.copy(os.path.join(s, "id_ed25519.pub"), os.path.join(s, "authorized_keys"))
        with open(os.path.join(s, "host_ed25519.pub")) as f:
            hostkey = " ".join(f.read().split()[:2])
        with open(os.path.join(s, "known_hosts"), "w") as f:
            f.write(f"[127.0.0.1]:{self.ssh_client_port} {hostkey}\n")
        # sftp-server under /usr/bin/time, appending one peak-RSS line per session.
        wrap = os.path.join(s, "sftp-server-timed")
        with open(wrap, "w") as f:
            f.write("#!/bin/sh\n"
                    f"exec /usr/bin/time -a -f %M -o {s}/sftp_rss /usr/lib/openssh/sftp-server \"$@\"\n")
        os.chmod(wrap, 0o755)
        conf = os.path.join(s, "sshd_config")
        with open(conf, "w") as f:
            f.write(f"""# Throwaway sshd for bench/push; the system's sshd config is not used.
Port {SSH_PORT}
ListenAddress 127.0.0.1
HostKey {s}/host_ed25519
PidFile {s}/sshd.pid
AuthorizedKeysFile {s}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
MaxSessions 64
MaxStartups 64:30:128
Subsystem sftp {wrap}
LogLevel ERROR
""")
        os.makedirs("/run/sshd", exist_ok=True)  # privilege separation dir sshd insists on
        sh(["/usr/sbin/sshd", "-t", "-f", conf])
        errlog = open(os.path.join(self.logs, "sshd.log"), "ab")
        # Debian's bash sources ~/.bashrc for every command run over ssh. Root's .bashrc on a
        # dev box can be slow (here: `pyenv init`, 0.1-0.3 s), which would bill every rsync
        # run and every one of rclone's md5sum calls. So sshd runs in its own mount namespace
        # with an empty file over ~/.bashrc, like a plain server; the real file is untouched.
        cmd = ["/usr/sbin/sshd", "-f", conf, "-D", "-e"]
        bashrc = os.path.expanduser("~root/.bashrc")
        if os.path.exists(bashrc) and shutil.which("unshare"):
            empty = os.path.join(s, "empty_bashrc")
            open(empty, "w").close()
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'mount --bind "{empty}" "{bashrc}" && exec "$@"', "sh"] + cmd
        self.sshd = subprocess.Popen(self.ns + cmd, stderr=errlog)
        self.ssh_cmd = (f"ssh -p {self.ssh_client_port} -i {s}/id_ed25519 -o IdentitiesOnly=yes "
                        f"-o UserKnownHostsFile={s}/known_hosts -o StrictHostKeyChecking=yes "
                        f"-o BatchMode=yes")
        for _ in range(50):
            r = subprocess.run(self.ns + self.ssh_cmd.split() + ["root@127.0.0.1", "true"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if r.returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise SystemExit("the bench sshd on 127.0.0.1:%d does not answer" % SSH_PORT)
        log(f"sshd on 127.0.0.1:{SSH_PORT} (pid {self.sshd.pid})")

    def setup_rclone(self):
        self.rclone_conf = os.path.join(self.ssh, "rclone.conf")
        with open(self.rclone_conf, "w") as f:
            f.write(f"""[bench]
type = sftp
host = 127.0.0.1
port = {self.ssh_client_port}
user = root
key_file = {self.ssh}/id_ed25519
known_hosts_file = {self.ssh}/known_hosts
shell_type = unix
""")

    def certs(self, d, *args):
        sh([os.path.join(self.bin, "stackclone-certs"), "--dir", d, *args],
           stdout=subprocess.DEVNULL, cwd=self.sc)

    def setup_stackclone(self):
        src_id, tgt_id = os.path.join(self.sc, "src_id"), os.path.join(self.sc, "tgt_id")
        if not os.path.exists(os.path.join(tgt_id, "host.crt")):
            for d in (src_id, tgt_id):
                if os.path.exists(d):
                    shutil.rmtree(d)
            # Offline enrollment (certs/README.md): init on the CA host, csr -> sign -> install.
            self.certs(src_id, "init", "--name", "primary")
            csr, bundle = os.path.join(self.sc, "standby.csr.json"), os.path.join(self.sc, "standby.bundle.json")
            self.certs(tgt_id, "csr", "--name", "standby", "--out", csr)
            self.certs(src_id, "sign", csr, "--role", "target", "--out", bundle)
            shown = subprocess.run([os.path.join(self.bin, "stackclone-certs"), "--dir", src_id, "show", "--json"],
                                   check=True, capture_output=True, text=True).stdout
            pin = json.loads(shown)["ca"]["pin"]
            self.certs(tgt_id, "install", bundle, "--ca-pin", pin)
        self.src_id, self.tgt_id = src_id, tgt_id

    def write_stackclone_configs(self, datasets):
        q = self.quic_port
        tdir = os.path.join(self.sc, "target")
        os.makedirs(os.path.join(tdir, "conf.d"), exist_ok=True)
        with open(os.path.join(tdir, "target.toml"), "w") as f:
            f.write(f'listen = "127.0.0.1:{q}"\nidentity_dir = "{self.tgt_id}"\n')
        for variant, suffix, precopy in (("src", "", "false"), ("srcpc", "-pc", "true")):
            d = os.path.join(self.sc, variant)
            os.makedirs(os.path.join(d, "conf.d"), exist_ok=True)
            with open(os.path.join(d, "source.toml"), "w") as f:
                f.write(f'identity_dir = "{self.src_id}"\n\n[targets.standby]\n'
                        f'address = "127.0.0.1:{self.quic_client_port}"\n')
            for old in os.listdir(os.path.join(d, "conf.d")):
                os.unlink(os.path.join(d, "conf.d", old))
            for ds in datasets:
                with open(os.path.join(d, "conf.d", f"{ds.name}.toml"), "w") as f:
                    f.write(f'stack = "{ds.name}{suffix}"\npath = "{ds.root}"\ntarget = "standby"\n'
                            f'docker = false\nprecopy = {precopy}\n')
        for old in os.listdir(os.path.join(tdir, "conf.d")):
            os.unlink(os.path.join(tdir, "conf.d", old))
        for ds in datasets:
            for tool, suffix in (("stackclone", ""), ("stackclone-precopy", "-pc")):
                with open(os.path.join(tdir, "conf.d", f"{ds.name}{suffix}.toml"), "w") as f:
                    f.write(f'stack = "{ds.name}{suffix}"\npath = "{self.tpath(tool, ds)}"\n'
                            f'allow = ["primary"]\ndocker = false\n'
                            f'state_dir = "{self.sc_state(tool, ds)}"\n')

    def setup_nft(self):
        # Through the proxy every byte crosses lo twice (client <-> proxy <-> server). Count it
        # once, where it leaves the emulated link: proxy -> server (dport = the server's port)
        # and proxy -> client (sport = the proxy's port). Without a proxy both are the same.
        ssh_c, quic_c = self.ssh_client_port, self.quic_client_port
        if self.link:
            # In the namespace: on lo's ingress, after segmentation. TCP hands the IP layer
            # 64 KiB GSO packets whatever the device offers (and the output hook counts one set
            # of headers for each); with TSO/GSO off on lo they are cut into 1500-byte segments
            # before lo receives them, so this counts headers as a 1500-byte link carries them.
            self.nft_family = "netdev"
            hook, match = 'type filter hook ingress device "lo" priority 0', ""
        else:
            self.nft_family = "inet"
            hook, match = "type filter hook output priority 0", 'oif "lo" '
        subprocess.run(self.ns + ["nft", "delete", "table", self.nft_family, NFT_TABLE],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rules = f"""table {self.nft_family} {NFT_TABLE} {{
  counter ssh {{ }}
  counter quic {{ }}
  chain count {{
    {hook}; policy accept;
    {match}tcp dport {SSH_PORT} counter name "ssh"
    {match}tcp sport {ssh_c} counter name "ssh"
    {match}udp dport {self.quic_port} counter name "quic"
    {match}udp sport {quic_c} counter name "quic"
  }}
}}
"""
        r = subprocess.run(self.ns + ["nft", "-f", "-"], input=rules.encode(), capture_output=True)
        self.nft = r.returncode == 0
        if self.nft:
            log(f"nft counters on lo{' ingress in ' + NETNS if self.link else ''}: tcp dport {SSH_PORT} + "
                f"sport {ssh_c}, udp dport {self.quic_port} + sport {quic_c}")
        else:
            self.notes.append("nft unavailable; wire bytes are /proc/net/dev `lo` deltas "
                              f"({r.stderr.decode().strip()})")
            log(self.notes[-1])

    def wire_counter(self, name):
        """Bytes counted so far; the packets as well in self.last_packets (nft only)."""
        self.last_packets = None
        if self.nft:
            out = subprocess.run(self.ns + ["nft", "-j", "list", "counter", self.nft_family, NFT_TABLE, name],
                                 capture_output=True, check=True).stdout
            for obj in json.loads(out)["nftables"]:
                if "counter" in obj:
                    self.last_packets = obj["counter"]["packets"]
                    return obj["counter"]["bytes"]
            raise RuntimeError("no counter in nft output")
        # (Through a proxy this counts every byte twice; the report says nft was missing.)
        out = subprocess.run(self.ns + ["cat", "/proc/net/dev"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.strip().startswith("lo:"):
                return int(line.split(":")[1].split()[8])  # tx bytes
        return 0

    def teardown(self):
        self.stop_target()
        for p in (self.sshd, self.linkem):
            if p and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.nft:
            subprocess.run(self.ns + ["nft", "delete", "table", self.nft_family, NFT_TABLE])
        if self.netns:
            remove_netns()
            self.netns = False
            log(f"network namespace {NETNS} removed")

    # ---- paths --------------------------------------------------------------------------
    def tpath(self, tool, ds):
        return os.path.join(self.tgt, tool, ds.name)

    def sc_state(self, tool, ds):
        return os.path.join(self.tgt, tool + "-state", ds.name)

    def src_state(self, tool, ds):
        return os.path.join(self.sc, "srcstate", f"{ds.name}-{tool}")

    # ---- stackclone target daemon ---------------------------------------------------------
    target_proc = None

    def start_target(self):
        self.stop_target()
        logf = os.path.join(self.logs, "target.log")
        start = os.path.getsize(logf) if os.path.exists(logf) else 0
        env = dict(os.environ, STACKCLONE_LOG="warn,stackclone=info")
        self.target_proc = subprocess.Popen(
            self.ns + [os.path.join(self.bin, "stackclone-target"), "--config",
             os.path.join(self.sc, "target", "target.toml"), "run"],
            stdout=subprocess.DEVNULL, stderr=open(logf, "ab"), env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with open(logf, "rb") as f:
                f.seek(start)
                if b"target listening" in f.read():
                    return
            if self.target_proc.poll() is not None:
                raise RuntimeError(f"stackclone-target exited with {self.target_proc.returncode}; see {logf}")
            time.sleep(0.02)
        raise RuntimeError(f"stackclone-target did not start listening in 120 s; see {logf}")

    def target_hwm_kib(self):
        try:
            with open(f"/proc/{self.target_proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def stop_target(self):
        p = self.target_proc
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                self.notes.append("stackclone-target did not stop within 60 s of SIGTERM (killed)")
        self.target_proc = None

    # ---- resets -------------------------------------------------------------------------
    # A first copy creates one inode per file. Right after many inodes were deleted, creating
    # new ones on an ext4 without a journal (as on the VM these figures come from) costs a scan
    # of the recently deleted ones (`recently_deleted` in `find_inode_bit`; measured: 30 % of
    # both cores, and rsync's first copy of 20,000 files at 9-15 s instead of 2.3 s), for up to
    # six minutes. So a reset moves the previous copy aside into the trash, which is emptied
    # when the run ends. (A run started minutes after a big delete pays for it all the same.)
    def discard(self, path):
        if not os.path.lexists(path):
            return
        trash = os.path.join(self.w, "trash")
        os.makedirs(trash, exist_ok=True)
        if shutil.disk_usage(self.w).free < self.trash_reserve:
            shutil.rmtree(path)
            note = "low disk: first copies ran after deleting the previous copy (see bench/README.md)"
            if note not in self.notes:
                self.notes.append(note)
            return
        self.trash_seq = getattr(self, "trash_seq", 0) + 1
        os.rename(path, os.path.join(trash, str(self.trash_seq)))

    def empty_trash(self):
        trash = os.path.join(self.w, "trash")
        if os.path.lexists(trash):
            shutil.rmtree(trash)
            os.sync()

    def reset_empty(self, tool, ds):
        p = self.tpath(tool, ds)
        self.discard(p)
        if tool.startswith("stackclone"):
            self.stop_target()
            for q in (self.sc_state(tool, ds), self.src_state(tool, ds)):
                self.discard(q)
        else:
            os.makedirs(p)
        # Let the disk absorb what the previous run left dirty, so it does not bill the next tool.
        os.sync()

    # ---- one run of one tool --------------------------------------------------------------
    def run_tool(self, tool, ds, measured=True):
        tf = os.path.join(self.tmp, "time_client")
        tr = os.path.join(self.tmp, "time_remote")
        for f in (tf, tr, os.path.join(self.ssh, "sftp_rss")):
            if os.path.exists(f):
                os.unlink(f)
        rec = {"tool": tool}
        src = ds.root
        dst = self.tpath(tool, ds)
        counter = None
        if tool.startswith("stackclone"):
            self.start_target()
            variant = "srcpc" if tool == "stackclone-precopy" else "src"
            stack = ds.name + ("-pc" if tool == "stackclone-precopy" else "")
            cmd = [os.path.join(self.bin, "stackclone-source"), "--config",
                   os.path.join(self.sc, variant, "source.toml"), "--state-dir",
                   self.src_state(tool, ds), "push", stack, "--json"]
            counter = "quic"
        elif tool == "rsync":
            cmd = ["rsync", "-aHAXS", "--numeric-ids", "--delete", "--stats", "-e", self.ssh_cmd,
                   f"--rsync-path=/usr/bin/time -f %M -o {tr} rsync", src + "/",
                   f"root@127.0.0.1:{dst}/"]
            counter = "ssh"
        elif tool == "rclone":
            cmd = ["rclone", "--config", self.rclone_conf, "sync", src, f"bench:{dst}",
                   "--sftp-md5sum-command=/usr/bin/md5sum", "--skip-links",
                   "--use-json-log", "-v", "--stats", "1h", "--stats-log-level", "NOTICE"]
            counter = "ssh"
        elif tool == "cp":
            cmd = ["cp", "-a", src + "/.", dst + "/"]
        else:
            raise ValueError(tool)
        # Network clients run in the namespace (`ip netns exec` execs, it does not fork).
        full = (self.ns if counter else []) + ["/usr/bin/time", "-f", "%M", "-o", tf] + cmd
        # Write back what the previous run left dirty, so it is not billed to this one.
        os.sync()
        before = self.wire_counter(counter) if counter else None
        packets_before = self.last_packets if counter else None
        udp_err = self.udp_errors() if self.link else None
        t0 = time.monotonic()
        r = subprocess.run(full, capture_output=True, timeout=self.a.timeout)
        wall = time.monotonic() - t0
        after = self.wire_counter(counter) if counter else None
        if udp_err is not None:
            rec["udp_rcvbuf_errors"] = (self.udp_errors() or 0) - udp_err
            if rec["udp_rcvbuf_errors"] > 0:
                self.notes.append(f"{tool} on {ds.name}: {rec['udp_rcvbuf_errors']} datagrams dropped by "
                                  "a full socket receive buffer in the namespace (proxy or agent behind)")
        rec["wall_s"] = wall
        rec["rc"] = r.returncode
        rec["wire_bytes"] = (after - before) if counter else None
        if counter and packets_before is not None and self.last_packets is not None:
            rec["wire_packets"] = self.last_packets - packets_before  # mean size: MTU check
        rec["rss_client_kib"] = _read_int(tf)
        out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
        with open(os.path.join(self.logs, f"{tool}.log"), "a") as f:
            f.write(f"==== {time.strftime('%H:%M:%S')} {ds.name} {' '.join(cmd)}\n"
                    f"rc={r.returncode} wall={wall:.3f}s\n--- stdout\n{out[-20000:]}\n--- stderr\n{err[-20000:]}\n")
        if tool.startswith("stackclone"):
            rec["rss_server_kib"] = self.target_hwm_kib()
            self.stop_target()
            try:
                o = json.loads(out)[0]
            except (ValueError, IndexError, KeyError):
                o = {"ok": False, "error": f"unparsable output: {out[:300]} {err[-300:]}"}
            if not o.get("ok"):
                rec["rc"] = rec["rc"] or 1
                rec["error"] = o.get("error")
            rec["tool_bytes"] = o.get("bytes_sent")
            rec["src_down_ms"] = o.get("source_downtime_ms")
            rec["tgt_down_ms"] = o.get("target_downtime_ms")
            rec["duration_ms"] = o.get("duration_ms")
            rec["files_sent"] = o.get("files_sent")
            rec["generation"] = o.get("generation")
        elif tool == "rsync":
            rec["rss_server_kib"] = _read_int(tr)
            sent = re.search(r"Total bytes sent: ([\d,.]+)", out)
            recv = re.search(r"Total bytes received: ([\d,.]+)", out)
            if sent and recv:
                rec["tool_bytes"] = _num(sent.group(1)) + _num(recv.group(1))
            rec["src_down_ms"] = rec["tgt_down_ms"] = wall * 1000
        elif tool == "rclone":
            rss = _read_ints(os.path.join(self.ssh, "sftp_rss"))
            rec["rss_server_kib"] = max(rss) if rss else None
            rec["sftp_sessions"] = len(rss)
            stats = None
            for line in err.splitlines():
                try:
                    j = json.loads(line)
                except ValueError:
                    continue
                if isinstance(j, dict) and "stats" in j:
                    stats = j["stats"]
            if stats:
                rec["tool_bytes"] = stats.get("bytes")
                rec["transfers"] = stats.get("transfers")
                rec["checks"] = stats.get("checks")
            rec["src_down_ms"] = rec["tgt_down_ms"] = wall * 1000
        elif tool == "cp":
            rec["src_down_ms"] = rec["tgt_down_ms"] = wall * 1000
        if rec["rc"] != 0:
            msg = (f"{tool} on {ds.name} exited {rec['rc']}: "
                   f"{rec.get('error') or err.strip()[-500:]}")
            log("!! " + msg)
            self.notes.append(msg)
        return rec

    # ---- verification ---------------------------------------------------------------------
    def verify(self, tool, ds, keep=100):
        """Compare the tool's target with the source: every entry, its type, size, content,
        mtime (seconds for rclone: SFTP v3 carries whole seconds) and mode (not rclone).

        One directory at a time, both sides listed side by side, so a million files cost one
        directory's listing in memory, not the whole tree. Returns (number of differences,
        the first `keep` of them); a dir missing on the target counts once, not per entry."""
        src, dst = ds.root, self.tpath(tool, ds)
        sample, count = [], 0

        def diff(msg):
            nonlocal count
            count += 1
            if len(sample) < keep:
                sample.append(msg)

        def listing(d):
            try:
                with os.scandir(d) as it:
                    return {e.name: e.stat(follow_symlinks=False) for e in it}
            except FileNotFoundError:
                return None

        todo = ["."]
        while todo:
            rel_d = todo.pop()
            here = listing(os.path.join(src, rel_d)) or {}
            there = listing(os.path.join(dst, rel_d))
            if there is None:
                diff(f"missing {rel_d}/")
                continue
            for name in sorted(here):
                rel = os.path.normpath(os.path.join(rel_d, name))
                sa, sb = here[name], there.pop(name, None)
                if sb is None:
                    diff(f"missing {rel}")
                    continue
                if (sa.st_mode >> 12) != (sb.st_mode >> 12):
                    diff(f"type {rel}")
                    continue
                if tool != "rclone" and sa.st_mode != sb.st_mode:
                    diff(f"mode {rel}")
                is_dir = stat.S_ISDIR(sa.st_mode)
                if tool == "rclone":
                    if not is_dir and sa.st_mtime_ns // 10**9 != sb.st_mtime_ns // 10**9:
                        diff(f"mtime {rel}")
                elif sa.st_mtime_ns != sb.st_mtime_ns:
                    diff(f"mtime {rel}{'/' if is_dir else ''}")
                if is_dir:
                    todo.append(rel)
                elif sa.st_size != sb.st_size:
                    diff(f"size {rel}")
                elif not _same_content(os.path.join(src, rel), os.path.join(dst, rel)):
                    diff(f"content {rel}")
            for name in sorted(there):
                diff(f"extra {os.path.normpath(os.path.join(rel_d, name))}")
        return count, sample

    # ---- the run --------------------------------------------------------------------------
    def record(self, ds, scen, rep, rec):
        rec.update({"dataset": ds.name, "scenario": scen, "rep": rep, "load": loadavg(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.records.append(rec)
        with open(self.results_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        extra = ""
        if rec.get("src_down_ms") is not None and rec["tool"].startswith("stackclone"):
            extra = f" src-down {rec['src_down_ms']} ms tgt-down {rec.get('tgt_down_ms')} ms"
        log(f"  {ds.name:5} {scen:8} rep {rep} {rec['tool']:18} {rec['wall_s']:8.2f} s  "
            f"wire {_mib(rec.get('wire_bytes'))} MiB  tool {_mib(rec.get('tool_bytes'))} MiB  "
            f"rss {_kib_mib(rec.get('rss_client_kib'))}/{_kib_mib(rec.get('rss_server_kib'))} MiB{extra}"
            f"{'' if rec['rc'] == 0 else '  FAILED rc=%s' % rec['rc']}")

    def run(self):
        a = self.a
        datasets = [Dataset(os.path.join(self.data, k), k, a.scale, a.seed) for k in a.datasets]
        for ds in datasets:
            t0 = time.monotonic()
            if ds.ensure(log=log):
                log(f"{ds.name}: generated in {time.monotonic() - t0:.1f} s")
        self.write_stackclone_configs(datasets)
        if os.path.exists(self.results_path):
            os.rename(self.results_path, self.results_path + ".prev")
        self.meta = machine_info()
        self.meta.update({"command": a.command_line, "scale": a.scale, "reps": a.reps,
                          "rclone_reps": a.rclone_reps, "seed": a.seed, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "load_start": loadavg(), "datasets": {d.name: d.describe() for d in datasets},
                          "wire": "nft" if self.nft else "/proc/net/dev lo",
                          "link": self.a.link, "link_profile": self.link, "link_check": self.link_check})
        self.meta["versions"] = tool_versions(self.bin)
        with open(os.path.join(self.w, "meta.json"), "w") as f:
            json.dump(self.meta, f, indent=1)
        self.verify_results = {}
        self.empty_trash()  # what an interrupted run left
        for ds in datasets:
            # A copy goes to the trash only while the disk keeps room for two more, and 1 GiB.
            self.trash_reserve = 2 * self.meta["datasets"][ds.name]["bytes"] + (1 << 30)
            for scen in SCENARIOS:
                tools = [t for t in a.tools if not (t == "cp" and scen != "first")]
                for rep in range(a.reps):
                    # Alternate the order so no tool always runs first (warm page cache, load).
                    k = rep % len(tools)
                    order = tools[k:] + tools[:k]
                    order = [t for t in order if not (t == "rclone" and rep >= a.rclone_reps)]
                    if scen == "changed":
                        ds.mutate()
                        os.sync()
                    for tool in order:
                        if scen == "first":
                            self.reset_empty(tool, ds)
                        rec = self.run_tool(tool, ds)
                        self.record(ds, scen, rep, rec)
                        last = rep == min(a.reps, a.rclone_reps if tool == "rclone" else a.reps) - 1
                        if last and a.verify:
                            ndiff, diffs = self.verify(tool, ds)
                            self.verify_results[(ds.name, scen, tool)] = ndiff
                            if ndiff:
                                msg = (f"verify {tool} {ds.name} {scen}: {ndiff} difference(s), "
                                       f"e.g. {diffs[:5]}")
                                log("!! " + msg)
                                self.notes.append(msg)
                            else:
                                log(f"  verify {tool} {ds.name} {scen}: identical")
                    if scen == "changed":
                        ds.revert()
                        if rep < a.reps - 1:
                            for tool in order:  # back to the base set, untimed
                                rec = self.run_tool(tool, ds, measured=False)
                                if rec["rc"] != 0:
                                    self.notes.append(f"untimed reset of {tool} on {ds.name} failed")
            if not a.keep:
                self.stop_target()
                for tool in a.tools:
                    for p in (self.tpath(tool, ds), self.sc_state(tool, ds), self.src_state(tool, ds)):
                        self.discard(p)
        self.empty_trash()
        self.meta["load_end"] = loadavg()
        self.meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")


def remove_netns():
    """Removes the bench's namespace, if there is one. Anything still running in it was started
    by the bench (an ssh session's child, a client killed mid-run): it is ended by pid first, as
    a namespace outlives its name while a process is in it."""
    r = subprocess.run(["ip", "netns", "pids", NETNS], capture_output=True, text=True)
    if r.returncode != 0:
        return
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", NETNS])


# ---- report -------------------------------------------------------------------------------
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def report(b, records, meta, verify_results, notes):
    a = b.a
    lines = []
    P = lines.append
    P("# stackclone push benchmark")
    P("")
    P(f"Command: `{meta['command']}`  ")
    P(f"Started {meta['started']}, finished {meta.get('finished', '?')}. "
      f"Load average at start {meta['load_start']}, at end {meta.get('load_end', '?')}.  ")
    P(f"Machine: {meta['nproc']} CPUs ({meta['cpu']}), {meta['ram_gib']:.1f} GiB RAM, "
      f"{meta['disk']}; kernel {meta['kernel']}.  ")
    P(f"Tools: {meta['versions']}.  ")
    P(f"Scale {meta['scale']}, seed {meta['seed']}, {meta['reps']} repetitions "
      f"({meta['rclone_reps']} for rclone); wire bytes from {meta['wire']}.  ")
    prof, chk = meta.get("link_profile"), meta.get("link_check")
    if not prof:
        P("Link: loopback (127.0.0.1, no shaping).")
    else:
        P(f"Link: **{meta['link']}**, emulated by stackclone-bench-linkem in a network namespace: "
          f"RTT {prof['rtt_ms']:g} ms, {prof['rate_mbit']:g} Mbit/s each way, "
          f"{prof['loss'] * 100:g} % loss of UDP datagrams (none for TCP), MTU 1500.")
        if chk:
            P(f"Measured through the proxy before the run: RTT median UDP {chk['udp_rtt_ms']['median']:.2f} ms, "
              f"TCP {chk['tcp_rtt_ms']['median']:.2f} ms; bulk TCP {chk['tcp_bulk']['mbit_s_ip']:.0f} Mbit/s, "
              f"UDP {chk['udp_bulk']['mbit_s_ip']:.0f} Mbit/s (IP bytes).")
    P("")
    P("Datasets: " + "; ".join(
        f"`{n}` {d['files']} files, {d['bytes'] / MIB:.1f} MiB" for n, d in meta["datasets"].items()))
    P("")
    P("Each cell is the median over the repetitions (n = number of successful runs). "
      "wire = IP bytes on loopback both ways (nft counter on the tool's port; through the link "
      "proxy, on lo's ingress on the legs from the proxy to either end, so each byte counts once "
      "and each 1500-byte segment its headers); "
      "tool = what the tool reports (stackclone: `bytes_sent`, file payload after zstd; "
      "rsync: --stats total bytes sent + received; rclone: stats.bytes, file bytes uploaded). "
      "RSS = peak resident set, client / server side. src-down / tgt-down: stackclone's "
      "`source_downtime_ms` / `target_downtime_ms`; for the other tools the whole run "
      "(stop the stack, sync, start it; the target dir changes during the whole run).")
    P("")
    P("| dataset | scenario | tool | n | wall s (min-max) | wire MiB | tool MiB | RSS client MiB | RSS server MiB | src-down s | tgt-down s | verify |")
    P("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    groups = {}
    for r in records:
        groups.setdefault((r["dataset"], r["scenario"], r["tool"]), []).append(r)
    summary = {}
    for dsn in a.datasets:
        for scen in SCENARIOS:
            for tool in a.tools:
                rs = groups.get((dsn, scen, tool))
                if not rs:
                    continue
                ok = [r for r in rs if r["rc"] == 0]
                s = {
                    "n": len(ok), "failed": len(rs) - len(ok),
                    "wall": med(r["wall_s"] for r in ok),
                    "wmin": min((r["wall_s"] for r in ok), default=None),
                    "wmax": max((r["wall_s"] for r in ok), default=None),
                    "wire": med(r.get("wire_bytes") for r in ok),
                    "tool_bytes": med(r.get("tool_bytes") for r in ok),
                    "rss_c": max((r["rss_client_kib"] for r in ok if r.get("rss_client_kib")), default=None),
                    "rss_s": max((r["rss_server_kib"] for r in ok if r.get("rss_server_kib")), default=None),
                    "src_down": med(r.get("src_down_ms") for r in ok),
                    "tgt_down": med(r.get("tgt_down_ms") for r in ok),
                }
                summary[(dsn, scen, tool)] = s
                v = verify_results.get((dsn, scen, tool))
                vs = "-" if v is None else ("identical" if not v else f"{v} diffs")
                P(f"| {dsn} | {SCEN_TITLE[scen]} | {tool} | {s['n']}{' (+%d failed)' % s['failed'] if s['failed'] else ''} "
                  f"| {_f(s['wall'])} ({_f(s['wmin'])}-{_f(s['wmax'])}) | {_mib(s['wire'])} | {_mib(s['tool_bytes'])} "
                  f"| {_kib_mib(s['rss_c'])} | {_kib_mib(s['rss_s'])} | {_f(_div(s['src_down'], 1000))} "
                  f"| {_f(_div(s['tgt_down'], 1000))} | {vs} |")
    P("")
    P("RSS columns are the maximum over the repetitions, not the median.")
    P("")
    P("## Against the targets (stackclone ÷ rsync over ssh, same run)")
    P("")
    P("| dataset | scenario | time ratio | target | met | wire bytes ratio | vs `cp -a` | peak RSS src / tgt MiB (≤ 256) |")
    P("|---|---|---:|---|---|---:|---|---|")
    limits = {"first": 0.65, "nochange": 0.5, "changed": 0.33}
    for dsn in a.datasets:
        for scen in SCENARIOS:
            sc, rs = summary.get((dsn, scen, "stackclone")), summary.get((dsn, scen, "rsync"))
            if not sc or not rs or not sc["wall"] or not rs["wall"]:
                continue
            ratio = sc["wall"] / rs["wall"]
            met = ratio <= limits[scen]
            wr = _div(sc["wire"], rs["wire"])
            extra = ""
            if scen == "changed" and wr is not None:
                extra = " (bytes: " + ("met" if wr <= 1 else "missed") + ")"
            cpc = ""
            cp = summary.get((dsn, scen, "cp"))
            if scen == "first" and cp and cp["wall"]:
                cpc = f"{sc['wall'] / cp['wall']:.2f}× cp ({'met' if sc['wall'] <= cp['wall'] else 'missed'})"
            rssm = max(sc["rss_c"] or 0, sc["rss_s"] or 0) / 1024
            P(f"| {dsn} | {SCEN_TITLE[scen]} | {ratio:.2f} | ≤ {limits[scen]} | "
              f"{'met' if met else 'missed'}{extra} | {_f(wr)} | {cpc} | "
              f"{_kib_mib(sc['rss_c'])} / {_kib_mib(sc['rss_s'])} ({'met' if rssm <= 256 else 'missed'}) |")
    P("")
    P("## Source downtime (median, s)")
    P("")
    P("| dataset | scenario | stackclone | stackclone, pre-copy | rsync (stop, sync, start) | rclone (stop, sync, start) |")
    P("|---|---|---:|---:|---:|---:|")
    for dsn in a.datasets:
        for scen in SCENARIOS:
            row = []
            for tool in ("stackclone", "stackclone-precopy", "rsync", "rclone"):
                s = summary.get((dsn, scen, tool))
                row.append(_f(_div(s["src_down"], 1000)) if s else "-")
            P(f"| {dsn} | {SCEN_TITLE[scen]} | " + " | ".join(row) + " |")
    if notes:
        P("")
        P("## Notes from the run")
        P("")
        for n in notes:
            P(f"- {n}")
    return "\n".join(lines) + "\n", summary


# ---- helpers ------------------------------------------------------------------------------
def _same_content(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MIB), fb.read(4 * MIB)
            if x != y:
                return False
            if not x:
                return True


def _read_int(path):
    v = _read_ints(path)
    return v[-1] if v else None


def _read_ints(path):
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split() if x.isdigit()]
    except OSError:
        return []


def _num(s):
    return int(re.sub(r"[^\d]", "", s))


def _div(x, y):
    if x is None or y in (None, 0):
        return None
    return x / y


def _f(x):
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _mib(x):
    return "-" if x is None else (f"{x / MIB:.2f}" if x < 10 * MIB else f"{x / MIB:.1f}")


def _kib_mib(x):
    return "-" if x is None else f"{x / 1024:.0f}"


def machine_info():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        ram = int(f.readline().split()[1]) / 1024 / 1024
    disk = "?"
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", REPO],
                             capture_output=True, text=True).stdout.split()
        dev = os.path.basename(out[0])
        rot = open(f"/sys/block/{dev}/queue/rotational").read().strip() if os.path.exists(
            f"/sys/block/{dev}/queue/rotational") else "?"
        disk = f"{out[1]} on {out[0]} (rotational={rot})"
    except Exception:  # noqa: BLE001 - informational only
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": ram, "disk": disk,
            "kernel": platform.release()}


def tool_versions(bindir):
    def first(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            return (r.stdout or r.stderr).splitlines()[0].strip()
        except Exception:  # noqa: BLE001
            return "?"
    git = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return ", ".join([
        f"stackclone {git}{' + uncommitted changes' if dirty else ''}",
        first(["rsync", "--version"]).replace("  ", " "),
        first(["rclone", "version"]),
        first(["ssh", "-V"]),
        first(["cp", "--version"]),
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=os.path.join(REPO, "bench", "work", "push"),
                    help="work dir (data, targets, logs, results); default bench/work/push")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="dataset size factor: 20000*S small files, 4 files of 256 MiB*S, "
                         "1000000*S files for `million`")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per scenario and tool")
    ap.add_argument("--rclone-reps", type=int, default=None,
                    help="repetitions for rclone (default: --reps); it is by far the slowest")
    ap.add_argument("--datasets", default="small,big,both",
                    help="comma-separated: small, big, both, million (not in the default: a million "
                         "files take long)")
    ap.add_argument("--link", choices=list(LINKS), default="loopback",
                    help="loopback: plain 127.0.0.1 (default); lan: 1 Gbit/s, 1 ms RTT; "
                         "wan: 100 Mbit/s, 40 ms RTT, 0.1 %% datagram loss - through "
                         "stackclone-bench-linkem in a network namespace")
    ap.add_argument("--link-rtt-ms", type=float, help="override the --link profile's round trip")
    ap.add_argument("--link-rate-mbit", type=float, help="override its rate (each direction)")
    ap.add_argument("--link-loss", type=float,
                    help="override its share of lost UDP datagrams (e.g. 0 to compare QUIC and TCP "
                         "on equal terms: the TCP proxy loses nothing)")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quic-port", type=int, default=47443)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per tool run")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip comparing each target with the source after the last repetition")
    ap.add_argument("--keep", action="store_true", help="keep the target trees at the end")
    ap.add_argument("--target-dir", default=os.path.join(REPO, "target", "release"))
    ap.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.datasets = [d for d in a.datasets.split(",") if d]
    if a.link == "loopback" and any(x is not None for x in (a.link_rtt_ms, a.link_rate_mbit, a.link_loss)):
        ap.error("--link-rtt-ms, --link-rate-mbit and --link-loss need --link lan or wan")
    for d in a.datasets:
        if d not in ("small", "big", "both", "million"):
            ap.error(f"unknown dataset {d}; known: small, big, both, million")
    a.tools = [t for t in a.tools.split(",") if t]
    for t in a.tools:
        if t not in TOOLS:
            ap.error(f"unknown tool {t}; known: {', '.join(TOOLS)}")
    if a.rclone_reps is None:
        a.rclone_reps = a.reps
    a.command_line = a.command_line or " ".join(sys.argv)
    b = Bench(a)
    failed = None

    def stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # A kill or a closed terminal tears down like Ctrl-C does: sshd, proxy, namespace, nft.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    try:
        b.setup()
        b.run()
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - report what was measured
        import traceback
        traceback.print_exc()
        failed = e
        b.notes.append(f"the run stopped early: {e!r}")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # let the teardown finish
        b.teardown()
    if not b.records:
        raise SystemExit(f"nothing measured ({failed!r})")
    text, _ = report(b, b.records, b.meta, b.verify_results, b.notes)
    out = os.path.join(b.w, "results.md")
    with open(out, "w") as f:
        f.write(text)
    print()
    print(text)
    log(f"written to {out} (raw records: {b.results_path})")
    if failed is not None:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
