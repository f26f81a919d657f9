# The farm inventory: every client and builder, described once and read by
# both roles (builder.nix authorizes the clients, client.nix uses the
# builders). Usually `services.nixfarm.farm = import ./farm.nix;` on every
# machine of the farm; see examples/farm.nix.
{ config, lib, ... }:
let
  inherit (lib) mkOption types literalExpression;
  roles = config.services.nixfarm;
  # Checked once here, not in each role, so a machine that is both builder
  # and client reports each problem once.
  used = (roles.builder.enable or false) || (roles.client.enable or false);
  nixfarmLib = import ./lib.nix;
  d = nixfarmLib.builderDefaults;

  size = types.either types.ints.unsigned (types.strMatching "[0-9]+[KMGT]?");

  clientType = types.submodule {
    options = {
      publicKey = mkOption {
        type = types.singleLineStr;
        example = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ9... root@laptop";
        description = ''
          The client's SSH public key: one OpenSSH public key line, without
          options (the builder adds `restrict,command=...` itself). Its private
          half is {option}`services.nixfarm.client.sshKey` on the client.
        '';
      };
      signingKey = mkOption {
        type = types.nullOr (types.strMatching "[A-Za-z0-9._-]+:[A-Za-z0-9+/]{43}=");
        default = null;
        example = "laptop-nixfarm-1:Vbk9XFhMk3+9iWnH5Ylk0f2+0aHbc7vZJNnDsJKrwPA=";
        description = ''
          The client's Nix signing public key: the contents of
          {file}`/var/lib/nixfarm-client/signing-key.pub` on the client (the
          client module makes the key pair). With
          {option}`services.nixfarm.farm.trust` `"untrusted"` the builders
          trust store paths signed with it, and only those (and what they can
          substitute or what is content-addressed): without it, a build whose
          inputs this client built itself fails with "lacks a signature by a
          trusted key".
        '';
      };
      role = mkOption {
        type = types.enum nixfarmLib.roles;
        default = nixfarmLib.clientDefaults.role;
        description = ''
          What the key may do through `nixfarm gateway`: `build` (the Nix
          remote-build protocols and metrics), `metrics` (read-only metrics),
          `admin` (also store GC control).
        '';
      };
    };
  };

  builderType = types.submodule {
    options = {
      hostName = mkOption {
        type = types.str;
        example = "big.example.org";
        description = "The name clients use for the builder (in the machines file and ssh_config).";
      };
      address = mkOption {
        type = types.nullOr types.str;
        default = d.address;
        example = "192.0.2.10";
        description = "Address to connect to when {option}`hostName` does not resolve; `null`: resolve the host name.";
      };
      port = mkOption {
        type = types.port;
        default = d.port;
        description = "The builder's SSH port.";
      };
      hostKey = mkOption {
        type = types.singleLineStr;
        example = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMq...";
        description = ''
          The builder's SSH host public key (the contents of its
          {file}`/etc/ssh/ssh_host_ed25519_key.pub`). Clients trust only this key.
        '';
      };
      sshUser = mkOption {
        type = types.str;
        default = d.sshUser;
        description = "The account clients log in as; the builder module creates it.";
      };
      protocol = mkOption {
        type = types.enum [
          "ssh-ng"
          "ssh"
        ];
        default = d.protocol;
        description = ''
          `ssh-ng` (the Nix daemon protocol: `nix-daemon --stdio`) or `ssh`
          (legacy `nix-store --serve --write`). The gateway allows both.
        '';
      };
      systems = mkOption {
        type = types.listOf types.str;
        example = [
          "x86_64-linux"
          "i686-linux"
        ];
        description = "The systems the builder builds for.";
      };
      features = mkOption {
        type = types.listOf types.str;
        default = d.features;
        example = [
          "big-parallel"
          "kvm"
          "nixos-test"
        ];
        description = ''
          Supported system features. Clients send derivations that require
          these here; the builder sets its `system-features` to
          {option}`features` plus {option}`mandatoryFeatures` (when not empty).
        '';
      };
      mandatoryFeatures = mkOption {
        type = types.listOf types.str;
        default = d.mandatoryFeatures;
        example = [ "big-parallel" ];
        description = "Features a derivation must require to be sent to this builder.";
      };
      maxJobs = mkOption {
        type = types.ints.positive;
        default = d.maxJobs;
        example = 8;
        description = ''
          Build slots: the builder's `max-jobs` and number of build users
          (which, unlike `max-jobs`, caps builds across all clients), and the
          clients' static `maxJobs` fallback when the dispatcher is not running.
        '';
      };
      cores = mkOption {
        type = types.ints.unsigned;
        default = d.cores;
        example = 4;
        description = "`cores` for each build on the builder (0: all cores).";
      };
      speedFactor = mkOption {
        type = types.numbers.positive;
        default = d.speedFactor;
        description = "Static `speedFactor` fallback for clients (the dispatcher computes a live one).";
      };
      minFree = mkOption {
        type = size;
        default = d.minFree;
        example = "10G";
        description = ''
          When less than this is free in the builder's store, GC starts (Nix's
          `min-free`). Bytes, or a number with `K`, `M`, `G` or `T` (powers of
          1024), e.g. `"10G"` or `"512M"`.
        '';
      };
      maxFree = mkOption {
        type = size;
        default = d.maxFree;
        example = "50G";
        description = ''
          GC stops once this much is free (Nix's `max-free`); must be above
          {option}`minFree`. Same units as {option}`minFree`.
        '';
      };
    };
  };
in
{
  options.services.nixfarm.farm = {
    trust = mkOption {
      type = types.enum [
        "untrusted"
        "trusted"
      ];
      default = "untrusted";
      description = ''
        Whether builders trust their clients' Nix.
        `"untrusted"` (the default; Nix 2.16 or later on builders and
        clients, protocol `ssh-ng`): the builder user is not in
        `trusted-users`; a client cannot change the daemon's settings or add
        store paths that are not signed with a client key in the inventory
        ({option}`services.nixfarm.farm.clients.<name>.signingKey`), so a
        stolen client key (a CI runner's, say) does not own the builders.
        `"trusted"` (the only mode for Nix before 2.16): the builder user is
        a trusted user, which Nix's manual calls essentially equivalent to
        root; a stolen client key then owns every builder. See
        docs/threat-model.md.
      '';
    };
    clients = mkOption {
      type = types.attrsOf clientType;
      default = { };
      example = literalExpression ''
        {
          laptop.publicKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ9... root@laptop";
          ci = {
            publicKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK2... root@ci";
            role = "admin";
          };
        }
      '';
      description = ''
        Every machine allowed to use the builders, by name (the name shows in
        the builders' logs and metrics, and must match
        `${nixfarmLib.clientNameRegex}`).
      '';
    };
    builders = mkOption {
      type = types.attrsOf builderType;
      default = { };
      example = literalExpression ''
        {
          big = {
            hostName = "big.example.org";
            hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMq...";
            systems = [ "x86_64-linux" ];
            features = [ "big-parallel" "kvm" "nixos-test" "benchmark" ];
            maxJobs = 8;
            minFree = "20G";
            maxFree = "100G";
          };
        }
      '';
      description = "Every builder of the farm, by name.";
    };
  };

  config.assertions = lib.mkIf used (
    map (message: {
      assertion = false;
      inherit message;
    }) (nixfarmLib.checkInventory roles.farm)
  );
}
