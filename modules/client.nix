# services.nixfarm.client: this machine sends its builds to the farm.
#
# Options set here were checked against nixpkgs' own modules (nixos-25.05):
# nix.distributedBuilds, nix.buildMachines: config/nix-remote-build.nix;
# nix.settings.*: config/nix.nix; programs.ssh.*: programs/ssh.nix.
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
  cfg = config.services.nixfarm.client;
  farm = config.services.nixfarm.farm;
  builders = lib.filterAttrs (name: _: lib.elem name cfg.builders) farm.builders;
  sshKey = if cfg.sshKey == null then "/nonexistent-see-assertions" else cfg.sshKey;
  controlDir = "/run/nixfarm-ssh"; # connectionSharing's sockets

  untrusted = farm.trust == "untrusted";
  nixVersion = config.nix.package.version;
  ownEntry = farm.clients.${cfg.name} or { };
  signingKeyIsSafe =
    lib.hasPrefix "/" cfg.signingKeyFile && !lib.hasPrefix builtins.storeDir cfg.signingKeyFile;
  # Makes the signing key once, root-only, and its public half beside it.
  makeSigningKey = pkgs.writeShellScript "nixfarm-signing-key" ''
    set -eu
    key=${lib.escapeShellArg cfg.signingKeyFile}
    if [ ! -e "$key" ]; then
      ${pkgs.coreutils}/bin/mkdir -p "$(${pkgs.coreutils}/bin/dirname "$key")"
      tmp=$(${pkgs.coreutils}/bin/mktemp "$key.XXXXXX")
      ${pkgs.coreutils}/bin/rm -f "$tmp"
      (umask 077 && ${config.nix.package}/bin/nix-store --generate-binary-cache-key \
        ${lib.escapeShellArg "${cfg.name}-nixfarm-1"} "$tmp" "$tmp.pub")
      ${pkgs.coreutils}/bin/chmod 0644 "$tmp.pub"
      ${pkgs.coreutils}/bin/mv "$tmp.pub" "$key.pub"
      ${pkgs.coreutils}/bin/mv "$tmp" "$key"
    fi
    if [ -e "$key.pub" ]; then
      echo "this client's signing key: $(${pkgs.coreutils}/bin/cat "$key.pub")" \
        "(services.nixfarm.farm.clients.${cfg.name}.signingKey)"
    fi
  '';

  # Nix signs what it builds itself, not what a remote build sends back: unsigned, such
  # an output is refused as an input by the next untrusted builder. Nix runs the
  # post-build-hook for remote builds too, with their outputs in $OUT_PATHS.
  signOutputs = pkgs.writeShellScriptBin "nixfarm-sign-outputs" ''
    set -eu
    # shellcheck disable=SC2086 # one word per path
    exec ${config.nix.package}/bin/nix --extra-experimental-features nix-command \
      store sign --key-file ${lib.escapeShellArg cfg.signingKeyFile} $OUT_PATHS
  '';
  sshBuilders = lib.attrNames (lib.filterAttrs (_: b: b.protocol != "ssh-ng") builders);

  jsonFormat = pkgs.formats.json { };
  # What `nixfarm dispatch` reads: the builders as this client reaches them,
  # and the line Nix uses for each when the dispatcher knows nothing better.
  inventoryFile = jsonFormat.generate "nixfarm-inventory.json" {
    # For `nixfarm doctor` and `nixfarm sign-store`.
    inherit (farm) trust;
    signing_key_file = if untrusted then cfg.signingKeyFile else null;
    client = {
      name = cfg.name;
      key_file = sshKey;
    };
    builders = lib.mapAttrsToList (name: b: {
      inherit name;
      host_name = b.hostName;
      # Where to connect; the dispatcher's inventory wants a string, not null.
      address = if b.address == null then b.hostName else b.address;
      inherit (b) port protocol systems features;
      ssh_user = b.sshUser;
      mandatory_features = b.mandatoryFeatures;
      host_key = nixfarmLib.keyOnly b.hostKey;
      max_jobs = b.maxJobs;
      speed_factor = b.speedFactor;
      static_line = nixfarmLib.machinesLine (b // { inherit sshKey; });
    }) builders;
  };
  machinesDir = dirOf cfg.dispatcher.machinesFile;
  seedMachines = pkgs.writeShellScript "nixfarm-seed-machines" ''
    set -eu
    tmp=$(${pkgs.coreutils}/bin/mktemp ${machinesDir}/.machines.XXXXXX)
    ${pkgs.coreutils}/bin/cat /etc/nix/machines > "$tmp"
    ${pkgs.coreutils}/bin/chmod 0644 "$tmp"
    ${pkgs.coreutils}/bin/mv -f "$tmp" ${cfg.dispatcher.machinesFile}
  '';
  builderNames = lib.concatStringsSep ", " (lib.attrNames farm.builders);
  isUnknown = name: !(farm.builders ? ${name});
  unknownBuilders = lib.concatStringsSep ", " (lib.filter isUnknown cfg.builders);
  keyPathIsSafe = lib.hasPrefix "/" cfg.sshKey && !lib.hasPrefix builtins.storeDir cfg.sshKey;
in
{
  imports = [ ./inventory.nix ];

  options.services.nixfarm.client = {
    enable = mkEnableOption "the nixfarm client role";

    package = mkOption {
      type = types.package;
      default = pkgs.nixfarm or (pkgs.callPackage ./package.nix { });
      defaultText = literalExpression "pkgs.nixfarm or (pkgs.callPackage ./package.nix { })";
      description = "The nixfarm package (the dispatcher).";
    };

    name = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      description = ''
        This client's name in {option}`services.nixfarm.farm.clients`, where
        its public key must be listed for the builders to accept it.
      '';
    };

    sshKey = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/nix/nixfarm_ed25519";
      description = ''
        Path to this client's SSH private key (root-owned, mode 0600, no
        passphrase), used by nix-daemon and the dispatcher. A path string,
        never a Nix path: it must not be copied into the world-readable store.
        Create it with `ssh-keygen -t ed25519 -N "" -f /etc/nix/nixfarm_ed25519`.
      '';
    };

    signingKeyFile = mkOption {
      type = types.str;
      default = "/var/lib/nixfarm-client/signing-key";
      description = ''
        This client's Nix signing key (secret), with which its Nix signs
        what it builds (`secret-key-files`) when the builders do not trust
        their clients ({option}`services.nixfarm.farm.trust`). Made at boot
        if missing (root-only, `<name>-nixfarm-1`), with its public half in
        {file}`<this>.pub`, which goes into
        {option}`services.nixfarm.farm.clients.<name>.signingKey`. A path
        string, never a Nix path. Paths built before the key existed are
        signed with `nixfarm sign-store`.
      '';
    };

    signRemoteOutputs = mkOption {
      type = types.bool;
      default = true;
      description = ''
        With {option}`services.nixfarm.farm.trust` `"untrusted"`: sign what
        remote builds send back, with {option}`signingKeyFile`, from Nix's
        `post-build-hook` (Nix runs it for remote builds too). Nix signs only
        what it builds itself, and the next untrusted builder refuses an
        unsigned output as an input. If you have a `post-build-hook` of your
        own, set this to `false` and run `nixfarm-sign-outputs` (installed,
        reads `$OUT_PATHS`) from it.
      '';
    };

    builders = mkOption {
      type = types.listOf types.str;
      default = lib.attrNames farm.builders;
      defaultText = literalExpression "lib.attrNames config.services.nixfarm.farm.builders";
      example = [ "big" ];
      description = "Which builders of the farm inventory this client uses.";
    };

    buildersUseSubstitutes = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Nix's `builders-use-substitutes`: builders fetch what they can from
        binary caches themselves instead of receiving it from this client,
        which is usually the slower link.
      '';
    };

    connectTimeout = mkOption {
      type = types.ints.positive;
      default = 10;
      description = "ssh `ConnectTimeout` (seconds) to each builder: how long an unreachable builder can hold a build.";
    };

    serverAliveInterval = mkOption {
      type = types.ints.positive;
      default = 60;
      description = "ssh `ServerAliveInterval` (seconds): keepalives on an idle build connection.";
    };

    serverAliveCountMax = mkOption {
      type = types.ints.positive;
      default = 3;
      description = ''
        ssh `ServerAliveCountMax`: unanswered keepalives before ssh gives up,
        so a dead link fails a build after interval * count seconds.
      '';
    };

    connectionSharing = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Keep one SSH connection per builder open (OpenSSH `ControlMaster`)
          and run each build's session over it. Nix's build hook opens a new
          connection for every build, and the handshake is most of the time a
          build waits to start: sharing takes it off every build but the
          first (bench/README.md, "Results: with connection sharing"). Only
          root's ssh (nix-daemon's) shares; the sockets are in
          /run/nixfarm-ssh (root only). All the builds on a builder then share one link: a link
          that dies silently fails them together after
          `serverAliveInterval` × `serverAliveCountMax` seconds, and a build
          sent there meanwhile waits that long instead of `connectTimeout`.
        '';
      };

      persist = mkOption {
        type = types.ints.positive;
        default = 60;
        description = "ssh `ControlPersist` (seconds): how long a shared connection stays open after its last build.";
      };
    };

    dispatcher = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Run `nixfarm dispatch`, which watches every builder's load and
          health and keeps {option}`services.nixfarm.client.dispatcher.machinesFile`
          true (Nix's `builders` points there). Off: Nix uses the static
          {file}`/etc/nix/machines` from the inventory.
        '';
      };
      machinesFile = mkOption {
        type = types.str;
        default = "/var/lib/nixfarm-client/machines";
        description = ''
          The machines file the dispatcher keeps and Nix reads (`builders =
          @FILE`). Each dispatcher start first copies the static
          {file}`/etc/nix/machines` there, so Nix always has a valid file.
        '';
      };
      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "More arguments for `nixfarm dispatch`.";
      };
    };
  };

  config = mkIf cfg.enable {
    # `nixfarm status` for the client's users; nixfarm-sign-outputs for a post-build-hook of one's own.
    environment.systemPackages = [ cfg.package ] ++ lib.optional untrusted signOutputs;

    assertions = [
      {
        assertion = !untrusted || lib.versionAtLeast nixVersion "2.16";
        message = ''
          services.nixfarm.farm.trust is "untrusted", but this client's Nix is ${nixVersion}: its
          build hook sends untrusted builders what they can build from Nix 2.16 on. Use Nix 2.16
          or later (nix.package), or set services.nixfarm.farm.trust = "trusted"
          (docs/threat-model.md).
        '';
      }
      {
        assertion = !untrusted || sshBuilders == [ ];
        message = ''
          services.nixfarm.farm.trust is "untrusted", but ${lib.concatStringsSep ", " sshBuilders} use
          protocol "ssh": an untrusted builder refuses input-addressed builds over nix-store --serve
          ("you are not privileged to build input-addressed derivations"). Set their protocol to
          "ssh-ng" in services.nixfarm.farm.builders.
        '';
      }
      {
        assertion = signingKeyIsSafe;
        message = ''
          services.nixfarm.client.signingKeyFile must be an absolute path outside ${builtins.storeDir}
          (the store is world-readable), e.g. "/var/lib/nixfarm-client/signing-key".
        '';
      }
      {
        assertion = cfg.sshKey != null;
        message = ''
          services.nixfarm.client.sshKey is not set. Create a key as root with
            ssh-keygen -t ed25519 -N "" -f /etc/nix/nixfarm_ed25519
          set services.nixfarm.client.sshKey = "/etc/nix/nixfarm_ed25519"; and put the .pub
          file's line in services.nixfarm.farm.clients.${cfg.name}.publicKey.
        '';
      }
      {
        assertion = cfg.sshKey == null || keyPathIsSafe;
        message = ''
          services.nixfarm.client.sshKey must be an absolute path outside ${builtins.storeDir}
          (the store is world-readable): give the key file's path as a string,
          e.g. "/etc/nix/nixfarm_ed25519".
        '';
      }
      {
        assertion = builders != { };
        message = ''
          services.nixfarm.client has no builders: services.nixfarm.farm.builders is empty or
          services.nixfarm.client.builders names none of them. Describe the builders in the farm
          inventory (see examples/farm.nix).
        '';
      }
      {
        assertion = !(lib.any isUnknown cfg.builders);
        message = ''
          services.nixfarm.client.builders lists ${unknownBuilders}, which
          services.nixfarm.farm.builders does not have (it has: ${builderNames}).
        '';
      }
      {
        assertion = farm.clients ? ${cfg.name};
        message = ''
          services.nixfarm.client.name is "${cfg.name}", but services.nixfarm.farm.clients has no
          such client, so no builder would accept its key. Add its public key there, or set
          services.nixfarm.client.name to its entry.
        '';
      }
    ];

    warnings = lib.optional (untrusted && (ownEntry.signingKey or null) == null) ''
      services.nixfarm.farm.clients.${cfg.name}.signingKey is not set: the builders, which do not
      trust their clients (services.nixfarm.farm.trust), will refuse inputs this client built
      ("lacks a signature by a trusted key"). Set it to the contents of
      ${cfg.signingKeyFile}.pub (made at boot; `systemctl status nixfarm-signing-key` shows it).
    '';

    # Sign what this client's Nix builds, for untrusted builders to accept it as input.
    nix.settings.secret-key-files = mkIf untrusted [ cfg.signingKeyFile ];
    # Not mkDefault: a post-build-hook of your own then stops evaluation with both named
    # (set signRemoteOutputs = false and run nixfarm-sign-outputs from yours).
    nix.settings.post-build-hook = mkIf (untrusted && cfg.signRemoteOutputs) "${signOutputs}/bin/nixfarm-sign-outputs";
    systemd.services.nixfarm-signing-key = mkIf untrusted {
      description = "nixfarm: this client's Nix signing key";
      wantedBy = [ "multi-user.target" ];
      # nix-daemon reads secret-key-files for every build it signs.
      before = [ "nix-daemon.service" ];
      requiredBy = [ "nix-daemon.service" ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = makeSigningKey;
      };
    };

    nix.distributedBuilds = true;
    # The static fallback: nixpkgs writes it to /etc/nix/machines.
    nix.buildMachines = lib.mapAttrsToList (_: b: {
      inherit (b)
        hostName
        protocol
        sshUser
        systems
        maxJobs
        speedFactor
        mandatoryFeatures
        ;
      inherit sshKey;
      # nixpkgs appends mandatoryFeatures to supportedFeatures when it writes
      # the line (nix-remote-build.nix), so a feature in both would be listed twice.
      supportedFeatures = nixfarmLib.featuresNotMandatory b;
      publicHostKey = nixfarmLib.base64Encode (nixfarmLib.keyOnly b.hostKey);
    }) builders;

    nix.settings = {
      builders-use-substitutes = cfg.buildersUseSubstitutes;
      # A new build hook reads this file (each accepted build starts one), so the
      # dispatcher's atomic rewrites take effect without restarting anything.
      builders = mkIf cfg.dispatcher.enable "@${cfg.dispatcher.machinesFile}";
      # A build the hook postpones (no slot it may use) is asked about again only
      # every build-poll-interval seconds (Nix's default: 5). The dispatcher's
      # held slots postpone builds on purpose, so ask every second. Measured with
      # bench/bench_dispatch.py (3 clients x 12 builds, one run, same formula
      # variant): 21.9 s -> 13.5 s; bench/README.md, "History".
      # Setting in Nix's libstore/globals.hh (pollInterval, "build-poll-interval").
      build-poll-interval = mkIf cfg.dispatcher.enable (lib.mkDefault 1);
    };

    # Read by nix-daemon's ssh (root) and by the dispatcher. mkAfter: a Host
    # block runs until the next Host line, so keep it after other modules'
    # global lines (programs.ssh.extraConfig is placed before `Host *`).
    programs.ssh.extraConfig = lib.mkAfter (
      lib.concatMapStrings (
        b:
        nixfarmLib.sshHostBlock {
          builder = b;
          inherit sshKey;
          inherit (cfg) connectTimeout serverAliveInterval serverAliveCountMax;
          controlDir = if cfg.connectionSharing.enable then controlDir else null;
          controlPersist = cfg.connectionSharing.persist;
        }
      ) (lib.attrValues builders)
    );

    programs.ssh.knownHosts = lib.mapAttrs' (
      name: b:
      lib.nameValuePair "nixfarm-${name}" {
        hostNames = nixfarmLib.knownHostNames b;
        publicKey = nixfarmLib.keyOnly b.hostKey;
      }
    ) builders;

    environment.etc."nixfarm/inventory.json".source = inventoryFile;

    # current-load: where Nix's build hook counts each builder's load; the
    # dispatcher holds back slots there. Nix creates it at its first remote
    # build, the sandbox below needs it to exist before.
    systemd.tmpfiles.rules =
      lib.optionals cfg.dispatcher.enable [
        "d ${machinesDir} 0755 root root - -"
        "d /nix/var/nix/current-load 0755 root root - -"
      ]
      # The shared connections' sockets: whoever may open one runs builds as this client.
      ++ lib.optional cfg.connectionSharing.enable "d ${controlDir} 0700 root root - -";

    # A master connection to every builder, kept up before any build needs one: builds that
    # start at once with none up race to become it, and Nix 2.16+ then loses some
    # (NixOS/nix#14132; docs/client.md, "Connection sharing").
    systemd.services.nixfarm-ssh-masters = mkIf cfg.connectionSharing.enable {
      description = "nixfarm: one shared SSH connection to every builder, for nix-daemon's ssh";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      serviceConfig = {
        # As root, with root's ssh_config block and key, as nix-daemon's ssh.
        ExecStart = lib.escapeShellArgs (
          [
            (lib.getExe cfg.package)
            "ssh-masters"
            "--ssh"
            "${config.programs.ssh.package}/bin/ssh"
          ]
          ++ lib.mapAttrsToList (_: b: b.hostName) builders
        );
        Restart = "always";
        RestartSec = "5s";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ReadWritePaths = [ controlDir ];
        ProtectHome = "read-only";
      };
    };

    systemd.services.nixfarm-dispatch = mkIf cfg.dispatcher.enable {
      # Hold only the slot lock files this Nix reads (Lix names them its own way):
      # both namings cost the dispatcher a fifth more CPU with 300 builders (bench/README.md).
      environment.NIXFARM_LOCK_NAMES = if lib.getName config.nix.package == "lix" then "lix" else "nix";
      description = "nixfarm dispatcher: keeps Nix's machines file true to the builders' load";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      restartTriggers = [ inventoryFile ];
      serviceConfig = {
        # Start from the static list: Nix has a valid machines file from the
        # first moment. Atomic (rename).
        ExecStartPre = seedMachines;
        # And go back to it however the dispatcher stops (a crash included): its
        # own lines are all as wide as the biggest builder and rely on the slot
        # locks it holds, which end with it (docs/client.md, "How Nix is told").
        ExecStopPost = seedMachines;
        ExecStart = lib.escapeShellArgs (
          [
            (lib.getExe cfg.package)
            "dispatch"
            "--inventory"
            "/etc/nixfarm/inventory.json"
            "--machines"
            cfg.dispatcher.machinesFile
            # How soon this client's Nix takes a freed slot: how many builds
            # a builder may hold ahead (docs/client.md, "The formula").
            "--build-poll-interval"
            (toString config.nix.settings.build-poll-interval)
          ]
          ++ cfg.dispatcher.extraArgs
        );
        Restart = "on-failure";
        RestartSec = "10s";
        # Root for the client key (root-owned, 0600, as nix-daemon reads it);
        # everything else is taken away. It writes only the machines file's
        # directory and Nix's slot locks (created by the tmpfiles rules above).
        ReadWritePaths = [
          machinesDir
          "/nix/var/nix/current-load"
        ];
        CapabilityBoundingSet = "";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible"; # it never looks at other processes
        # AF_NETLINK: glibc's getaddrinfo asks the kernel for local addresses.
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
          "AF_NETLINK"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        # Not MemoryDenyWriteExecute: asyncssh's crypto goes through cffi,
        # whose callbacks may need writable+executable memory.
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
        UMask = "0022";
      };
    };
  };
}
