# systemd.services.nixfarm-agent for builder.nix: `nixfarm agent`, hardened.
# It runs as root because it will delete store paths (through nix-daemon) for
# GC; everything else root could do is taken away below.
{
  lib,
  package,
  agentInterval,
  configFile,
  restartTriggers,
}:
{
  description = "nixfarm builder agent (metrics state, store GC)";
  wantedBy = [ "multi-user.target" ];
  wants = [ "nix-daemon.socket" ];
  after = [ "nix-daemon.socket" ];
  inherit restartTriggers;

  environment = {
    NIXFARM_CONFIG = configFile;
    # Talk to nix-daemon even as root, so the daemon's locks and GC roots
    # apply and the store stays read-only to us (ProtectSystem below).
    NIX_REMOTE = "daemon";
  };

  serviceConfig = {
    Type = "notify";
    ExecStart = lib.escapeShellArgs [
      (lib.getExe package)
      "--config"
      configFile
      "agent"
      "--interval"
      (toString agentInterval)
    ];
    # Only the main process may send READY=1 / WATCHDOG=1 / STATUS=.
    NotifyAccess = "main";
    # The agent pings every min(interval, WatchdogSec / 2); a hung agent is
    # killed (SIGABRT) and, through Restart=, started again.
    WatchdogSec = "${toString (4 * agentInterval + 20)}s";
    Restart = "on-failure";
    RestartSec = "5s";
    TimeoutStartSec = "60s";

    # /var/lib/nixfarm, 0755: the gateway (the builder user) reads GC state there.
    StateDirectory = "nixfarm";
    StateDirectoryMode = "0755";
    UMask = "0022";

    # Root with one capability. CAP_SYS_PTRACE: GC ranks store paths by when
    # builds last used them, sampled from the build users' /proc/PID/environ,
    # maps, exe and cwd, which only ptrace-read access may open. Everything
    # else (/proc, /sys, nix.conf; nix-daemon, D-Bus over sockets) needs none.
    CapabilityBoundingSet = [ "CAP_SYS_PTRACE" ];
    AmbientCapabilities = "";
    NoNewPrivileges = true;

    ProtectSystem = "strict"; # everything read-only but StateDirectory
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectKernelTunables = true; # /proc/sys, /sys read-only (PSI, cgroups stay readable)
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true; # cgroupfs read-only: it reads nix-daemon's memory, never writes
    ProtectClock = true;
    ProtectHostname = true;
    # Not ProtectProc=invisible: counting builds means seeing nix-daemon's and
    # the build users' processes.
    # Not PrivateNetwork: the metrics read the real interfaces' rx/tx.
    # AF_NETLINK: pyroute2 (interface counters); AF_UNIX: nix-daemon, D-Bus, journal.
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_NETLINK"
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    # Not MemoryDenyWriteExecute: PyGObject (pydbus) creates libffi closures,
    # which need writable+executable memory on some platforms.
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    SystemCallErrorNumber = "EPERM";
  };
}
