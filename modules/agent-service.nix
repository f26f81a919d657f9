# systemd.services.nixfarm-agent for builder.nix: `nixfarm agent`, hardened.
#
# It runs as root because its store GC deletes paths, but it never writes the
# store itself: every nix-store call goes to nix-daemon (NIX_REMOTE below),
# which takes Nix's GC lock, re-checks roots and temp roots, and remounts the
# read-only /nix/store as it always does. That is what nix-gc.service gets
# by running as unconfined root (nixos/modules/services/misc/nix-gc.nix);
# here the daemon does the privileged part and everything else root could do
# is taken away below.
{
  lib,
  package,
  nixPackage,
  agentInterval,
  serveHttp ? false, # the Prometheus endpoint: AF_INET(6) allowed
  configFile,
  restartTriggers,
}:
{
  description = "nixfarm builder agent (metrics state, store GC)";
  wantedBy = [ "multi-user.target" ];
  wants = [ "nix-daemon.socket" ];
  after = [ "nix-daemon.socket" ];
  inherit restartTriggers;

  # The GC runs nix-store (--gc --print-dead, --delete) from PATH: the
  # system's Nix, the same version as the daemon it talks to.
  path = [ nixPackage ];

  environment = {
    NIXFARM_CONFIG = configFile;
    # Talk to nix-daemon even as root, so the daemon's locks and GC roots
    # apply and the store stays read-only to us (ProtectSystem below). As a
    # local-store root process Nix would remount /nix/store read-write in a
    # new mount namespace, which needs CAP_SYS_ADMIN, and would scan other
    # processes for runtime roots itself, skipping those it cannot read.
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

    # /var/lib/nixfarm, 0755: the gateway (the builder user) reads GC state
    # there; the control socket and the stream socket (streams hand their
    # session to the agent, which serves them all one snapshot) in it are
    # 0660 with the control_group.
    StateDirectory = "nixfarm";
    StateDirectoryMode = "0755";
    UMask = "0022";

    # Root with three capabilities, nothing else:
    # - CAP_SYS_PTRACE: GC ranks store paths by when builds last used them,
    #   sampled from the build users' /proc/PID/{environ,maps,exe,cwd}; and
    #   the per-client accounts read which sockets nix-daemon's workers and
    #   the sessions' sshd hold (/proc/PID/fd). The kernel lets only
    #   ptrace-read access open those (proc(5)).
    # - CAP_DAC_READ_SEARCH: /proc/PID/environ is also mode 0400, owned by the
    #   build user, so root needs to bypass read permission for it (maps, exe
    #   and cwd need only the ptrace check).
    # - CAP_CHOWN: the control socket is chowned to root:control_group, a
    #   group root is not a member of (chown(2)).
    # Not CAP_NET_ADMIN, though sock_diag tells only such a listener the last
    # bytes of each TCP connection the kernel destroys (traffic.py): with
    # AF_NETLINK it could reconfigure the network. The last second of each
    # client connection goes uncounted instead; with connection sharing (the
    # client default) a connection outlives its builds by a minute, so that
    # is its closing handshake.
    # The Nix database, temp roots and nix.conf are root's own files; nix-daemon
    # and D-Bus are reached over sockets.
    CapabilityBoundingSet = [
      "CAP_SYS_PTRACE"
      "CAP_DAC_READ_SEARCH"
      "CAP_CHOWN"
    ];
    AmbientCapabilities = "";
    NoNewPrivileges = true;

    ProtectSystem = "strict"; # everything read-only but StateDirectory and:
    # The GC plans from Nix's SQLite database, opened read-only; SQLite still
    # needs to create the WAL's -shm file next to it when no Nix process has
    # the database open. Not /nix/store: deletions go through nix-daemon.
    ReadWritePaths = [ "/nix/var/nix/db" ];
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
    # AF_NETLINK: pyroute2 (interface counters, sock_diag for the clients'
    # connections); AF_UNIX: nix-daemon, D-Bus, journal; AF_INET(6) only for
    # the Prometheus endpoint.
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_NETLINK"
    ]
    ++ (
      if serveHttp then
        [
          "AF_INET"
          "AF_INET6"
        ]
      else
        [ ]
    );
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    # Not MemoryDenyWriteExecute: PyGObject (pydbus) creates libffi closures,
    # which need writable+executable memory on some platforms.
    SystemCallArchitectures = "native";
    # In order: allow @system-service, take away @privileged, then give back
    # @chown (part of @privileged) for the control socket's group and SQLite's
    # fchown of the -shm file (systemd.exec(5), SystemCallFilter=).
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
      "@chown"
    ];
    SystemCallErrorNumber = "EPERM";
  };
}
