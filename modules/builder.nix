# services.nixfarm.builder: this machine builds for the farm's clients.
#
# Options set here were checked against nixpkgs' own modules (nixos-25.05):
# nix.settings.* and nix.nrBuildUsers: config/nix.nix, services/system/nix-daemon.nix;
# users.users.*: config/users-groups.nix; services.openssh.*: services/networking/ssh/sshd.nix.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    types
    literalExpression
    ;
  nixfarmLib = import ./lib.nix;
  cfg = config.services.nixfarm.builder;
  farm = config.services.nixfarm.farm;
  entry = farm.builders.${cfg.name} or null;
  builderNames = lib.concatStringsSep ", " (lib.attrNames farm.builders);
  fromEntry = attr: if entry == null then nixfarmLib.builderDefaults.${attr} else entry.${attr};

  jsonFormat = pkgs.formats.json { };
  agentConfigFile = jsonFormat.generate "nixfarm-agent.json" cfg.settings;

  # IPv6 addresses go in brackets before the port.
  listenHost =
    let
      a = cfg.prometheus.listenAddress;
    in
    if lib.hasInfix ":" a then "[${a}]" else a;

  size = types.either types.ints.unsigned (types.strMatching "[0-9]+[KMGT]?");
  # systemd.resource-control(5): bytes with K/M/G/T, a percentage of RAM, or "infinity".
  memoryLimit = types.nullOr (types.strMatching "[0-9]+[KMGT]?|[0-9]+(\\.[0-9]+)?%|infinity");

  untrusted = farm.trust == "untrusted";
  # Clients that may send store paths (metrics keys cannot run Nix's protocols).
  buildClients = lib.filterAttrs (_: c: c.role != "metrics") farm.clients;
  unsignedClients = lib.attrNames (lib.filterAttrs (_: c: c.signingKey == null) buildClients);
  clientKeys = lib.filter (k: k != null) (lib.mapAttrsToList (_: c: c.signingKey) buildClients);
  nixVersion = config.nix.package.version;

  authorizedKeys = lib.mapAttrsToList (
    name: client:
    nixfarmLib.authorizedKeysLine {
      nixfarm = cfg.package;
      inherit name;
      inherit (client) role publicKey;
    }
  ) farm.clients;
in
{
  imports = [ ./inventory.nix ];

  options.services.nixfarm.builder = {
    enable = mkEnableOption "the nixfarm builder role";

    package = mkOption {
      type = types.package;
      default = pkgs.nixfarm or (pkgs.callPackage ./package.nix { });
      defaultText = literalExpression "pkgs.nixfarm or (pkgs.callPackage ./package.nix { })";
      description = "The nixfarm package: its gateway is the only command client keys can run.";
    };

    name = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      example = "big";
      description = ''
        This builder's name in {option}`services.nixfarm.farm.builders`; its
        entry there gives the defaults of the options below.
      '';
    };

    user = mkOption {
      type = types.str;
      default = fromEntry "sshUser";
      defaultText = literalExpression "services.nixfarm.farm.builders.<name>.sshUser";
      description = ''
        The system account clients log in as (no password, no home). Its
        authorized keys are the farm's clients, each forced to run
        `nixfarm gateway`; it is a Nix trusted user, as remote builds need.
      '';
    };

    maxJobs = mkOption {
      type = types.ints.positive;
      default = fromEntry "maxJobs";
      defaultText = literalExpression "services.nixfarm.farm.builders.<name>.maxJobs";
      description = "Nix's `max-jobs` on this builder (builds at once per client connection).";
    };

    buildUsers = mkOption {
      type = types.ints.positive;
      default = cfg.maxJobs;
      defaultText = literalExpression "config.services.nixfarm.builder.maxJobs";
      description = ''
        `nix.nrBuildUsers`. Nix's `max-jobs` caps each daemon connection, not
        the machine: with three clients, `max-jobs = 4` ran 8 builds at once.
        Every build needs a build user and waits for a free one, so this is
        what caps the builds of all clients together.
      '';
    };

    cores = mkOption {
      type = types.ints.unsigned;
      default = fromEntry "cores";
      defaultText = literalExpression "services.nixfarm.farm.builders.<name>.cores";
      description = "Nix's `cores`: CPU cores each build may use (0: all).";
    };

    minFree = mkOption {
      type = size;
      default = fromEntry "minFree";
      defaultText = literalExpression "services.nixfarm.farm.builders.<name>.minFree";
      example = "10G";
      description = ''
        Nix's `min-free`, in bytes or with `K`/`M`/`G`/`T` (powers of 1024).
        The agent reads it (and {option}`maxFree`) from nix.conf and keeps the
        store's free space between the two, also when no build runs.
      '';
    };

    maxFree = mkOption {
      type = size;
      default = fromEntry "maxFree";
      defaultText = literalExpression "services.nixfarm.farm.builders.<name>.maxFree";
      example = "50G";
      description = "Nix's `max-free`: GC stops once this much is free. Must be above {option}`minFree`.";
    };

    systemFeatures = mkOption {
      type = types.listOf types.str;
      default = lib.unique (fromEntry "features" ++ fromEntry "mandatoryFeatures");
      defaultText = literalExpression "features ++ mandatoryFeatures of this builder's entry";
      description = ''
        Nix's `system-features`. When empty, nixpkgs' default (`nixos-test`,
        `benchmark`, `big-parallel`, `kvm`, ...) is kept.
      '';
    };

    memoryMax = mkOption {
      type = memoryLimit;
      default = "90%";
      example = "48G";
      description = ''
        `MemoryMax` of nix-daemon.service, which holds every build: the kernel
        OOM-kills builds there before sshd, the agent or the rest of the
        machine run out. `null`: no limit.
      '';
    };

    memoryHigh = mkOption {
      type = memoryLimit;
      default = null;
      example = "80%";
      description = "`MemoryHigh` of nix-daemon.service: above it, builds are throttled and reclaimed. `null`: unset.";
    };

    oomScoreAdjust = mkOption {
      type = types.ints.between (-1000) 1000;
      default = 500;
      description = ''
        `OOMScoreAdjust` of nix-daemon.service, inherited by every build, so
        that under global memory pressure the kernel kills a build rather
        than sshd or the agent.
      '';
    };

    tasksMax = mkOption {
      type = types.nullOr (types.either types.ints.positive (types.strMatching "[0-9]+%|infinity"));
      default = null;
      example = 16384;
      description = "`TasksMax` of nix-daemon.service; `null` keeps the unit's own value.";
    };

    agentInterval = mkOption {
      type = types.ints.positive;
      default = 10;
      description = ''
        Seconds between the agent's status updates to systemd (`nixfarm agent
        --interval`); the watchdog allows 4 × this + 20 s. Free space is
        checked more often: see `gc_check_interval` in {option}`settings`.
      '';
    };

    shareClientNames = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Whether metrics-role keys see other clients' names: in snapshots
        (running builds, sessions, demand) and in `nixfarm accounts`.
        Otherwise such a key sees its own name and `(others)`. Build and admin
        keys always see the names.
      '';
    };

    prometheus = {
      enable = mkEnableOption "the agent's Prometheus endpoint (`/metrics` over HTTP, per-client counters included)";
      listenAddress = mkOption {
        type = types.str;
        default = "0.0.0.0";
        example = "127.0.0.1";
        description = "Address the endpoint listens on. `::` for every IPv6 and IPv4 address.";
      };
      port = mkOption {
        type = types.port;
        default = 9716;
        description = "Port of the endpoint.";
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Open {option}`port` in the firewall. Every client's name is in the
          counters' labels: open it only to your monitoring network.
        '';
      };
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = jsonFormat.type;
        options = {
          state_dir = mkOption {
            type = types.str;
            default = "/var/lib/nixfarm";
            readOnly = true;
            description = "Where the agent keeps its state (the service's StateDirectory).";
          };
          nix_bin_dir = mkOption {
            type = types.str;
            default = "${config.nix.package.out}/bin";
            defaultText = literalExpression ''"''${config.nix.package.out}/bin"'';
            description = "Where the gateway finds `nix-daemon` and `nix-store`: the system's Nix.";
          };
          network_interfaces = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [ "eth0" ];
            description = "Interfaces whose traffic the metrics count; empty: all but loopback.";
          };
          share_client_names = mkOption {
            type = types.bool;
            default = cfg.shareClientNames;
            defaultText = literalExpression "config.services.nixfarm.builder.shareClientNames";
            description = "See {option}`services.nixfarm.builder.shareClientNames`.";
          };
          prometheus_listen = mkOption {
            type = types.str;
            default = lib.optionalString cfg.prometheus.enable "${listenHost}:${toString cfg.prometheus.port}";
            defaultText = literalExpression ''"''${listenAddress}:''${toString port}" when services.nixfarm.builder.prometheus.enable, else ""'';
            description = "Where the agent serves Prometheus metrics (`ADDRESS:PORT`); `\"\"`: nowhere.";
          };
          control_group = mkOption {
            type = types.str;
            default = cfg.user;
            defaultText = literalExpression "config.services.nixfarm.builder.user";
            description = ''
              Group that may use the agent's control socket
              ({file}`/var/lib/nixfarm/control.sock`): the builder user's own
              group, so that admin-role keys can run `nixfarm gc --now` and
              `--dry-run` through the gateway. `""`: root only.
            '';
          };
        };
      };
      default = { };
      example = literalExpression ''
        {
          network_interfaces = [ "eth0" ];
          gc_check_interval = 5; # seconds between free-space checks
        }
      '';
      description = ''
        The agent and gateway configuration, written to
        {file}`/etc/nixfarm/agent.json` (keys: docs/builder.md, "Agent
        configuration"; an unknown key stops the agent with an error naming
        it). Leave out `min_free` and `max_free`: the agent then reads
        {option}`minFree` and {option}`maxFree` from nix.conf, as Nix does.
        Set them only for the agent to collect at other limits than Nix's own
        (bytes, `"10G"` or `"10%"` of the store's filesystem; a `min_free` of
        0 turns the agent's GC off). `gc_check_interval` and
        `usage_sample_interval` (seconds, default 1) set how often it checks
        free space and samples what builds use.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = entry != null;
        message = ''
          services.nixfarm.builder.name is "${cfg.name}", but services.nixfarm.farm.builders has no
          such builder (it has: ${builderNames}). Add it to the farm inventory, or set
          services.nixfarm.builder.name to this machine's entry.
        '';
      }
      {
        assertion = farm.clients != { };
        message = ''
          services.nixfarm.farm.clients is empty, so no client could use this builder. Add each
          client's public key there (see examples/farm.nix).
        '';
      }
      {
        # NixOS/nix#3921, in 2.16: input-addressed builds for untrusted users.
        assertion = !untrusted || lib.versionAtLeast nixVersion "2.16";
        message = ''
          services.nixfarm.farm.trust is "untrusted", but this builder's Nix is ${nixVersion}: Nix
          builds input-addressed derivations for untrusted users from 2.16 on. Use Nix 2.16 or
          later (nix.package), or set services.nixfarm.farm.trust = "trusted" (the builder user
          then is a trusted Nix user, as good as root: docs/threat-model.md).
        '';
      }
      {
        assertion = nixfarmLib.parseSize cfg.minFree < nixfarmLib.parseSize cfg.maxFree;
        message = ''
          services.nixfarm.builder.minFree (${toString cfg.minFree}) must be below
          services.nixfarm.builder.maxFree (${toString cfg.maxFree}): raise maxFree or lower minFree.
        '';
      }
    ];

    users.users.${cfg.user} = {
      isSystemUser = true;
      group = cfg.user;
      description = "nixfarm remote builds (SSH keys forced to nixfarm gateway)";
      # sshd runs a forced command as `$SHELL -c "<command>"`: nologin (the
      # system-user default, pkgs.shadow) would refuse every session.
      useDefaultShell = true;
      # "*": no password can match, and the account is not locked. Without a
      # password NixOS writes "!" (update-users-groups.pl), and sshd refuses
      # "!"-locked accounts whenever UsePAM is off (OpenSSH auth.c, allowed_user).
      hashedPassword = "*";
      openssh.authorizedKeys.keys = authorizedKeys;
    };
    users.groups.${cfg.user} = { };

    warnings = lib.optional (untrusted && unsignedClients != [ ]) ''
      services.nixfarm.farm.clients: ${lib.concatStringsSep ", " unsignedClients} have no signingKey.
      This builder does not trust its clients (services.nixfarm.farm.trust), so it accepts from
      them only what it can substitute itself or what is content-addressed: a build that needs an
      input they built fails with "lacks a signature by a trusted key". Set their signingKey to
      the contents of /var/lib/nixfarm-client/signing-key.pub on each.
    '';

    nix.settings = {
      # Trusted: the client's store paths may arrive unsigned, and a trusted
      # user is as good as root (Nix manual, conf-trusted-users). Untrusted
      # (Nix >= 2.16): the builder user is an ordinary Nix user, and what a
      # client sends must be signed with a client key of the inventory.
      trusted-users = mkIf (!untrusted) [ cfg.user ];
      # extra-: beside the binary caches' keys (nix.settings.trusted-public-keys).
      extra-trusted-public-keys = mkIf (untrusted && clientKeys != [ ]) clientKeys;
      max-jobs = cfg.maxJobs;
      cores = cfg.cores;
      min-free = nixfarmLib.parseSize cfg.minFree;
      max-free = nixfarmLib.parseSize cfg.maxFree;
      system-features = mkIf (cfg.systemFeatures != [ ]) cfg.systemFeatures;
    };

    # nix-daemon.nix sets this with mkDefault (at least 32); ours replaces it.
    nix.nrBuildUsers = cfg.buildUsers;

    # nix-daemon.nix declares the unit; serviceConfig is systemd's freeform
    # attrset, so these become [Service] lines of nix-daemon.service.
    systemd.services.nix-daemon.serviceConfig = lib.filterAttrs (_: v: v != null) {
      # A build killed at MemoryMax is one failed build, not a reason to stop
      # the daemon and every other client's builds with it. systemd's default
      # OOMPolicy is DefaultOOMPolicy=stop unless Delegate= is on
      # (systemd.service(5)); Nix's own unit sets Delegate=yes in newer
      # versions, so this only makes it explicit for every Nix.
      OOMPolicy = "continue";
      MemoryAccounting = true;
      MemoryMax = cfg.memoryMax;
      MemoryHigh = cfg.memoryHigh;
      OOMScoreAdjust = cfg.oomScoreAdjust;
      TasksMax = cfg.tasksMax;
    };

    environment.etc."nixfarm/agent.json".source = agentConfigFile;

    services.openssh.enable = true;
    # After every other sshd_config line: a Match block runs to the end of the
    # file, so nothing may follow it by accident. Belt and braces with the
    # keys' own `restrict`: whatever a key says, this account gets no
    # forwarding, no tty, no ~/.ssh/rc, no password, no home-dir keys.
    services.openssh.extraConfig = lib.mkAfter ''
      Match User ${cfg.user}
        AuthenticationMethods publickey
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        AuthorizedKeysFile /etc/ssh/authorized_keys.d/%u
        DisableForwarding yes
        AllowTcpForwarding no
        AllowAgentForwarding no
        AllowStreamLocalForwarding no
        X11Forwarding no
        PermitTunnel no
        PermitTTY no
        PermitUserRC no
    '';

    networking.firewall.allowedTCPPorts = mkIf (cfg.prometheus.enable && cfg.prometheus.openFirewall) [
      cfg.prometheus.port
    ];

    systemd.services.nixfarm-agent = import ./agent-service.nix {
      inherit lib;
      inherit (cfg) package agentInterval;
      serveHttp = cfg.settings.prometheus_listen != "";
      nixPackage = config.nix.package;
      configFile = "/etc/nixfarm/agent.json";
      restartTriggers = [ agentConfigFile ];
    };
  };
}
