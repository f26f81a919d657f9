# Every node of every VM test (nixos-tests/<test>.nix), evaluated as a NixOS
# machine with nixpkgs' eval-config.nix, as one JSON value for
# tests/test_nix_modules.py: what `nix flake check` needs of each node before
# a VM boots (its assertions, warnings, nix.conf, the /etc entries and units
# nixfarm and the tests make).
# nix-instantiate --eval --strict --json tests/nix/vm-node-facts.nix --argstr nixpkgs $NIXPKGS
{ nixpkgs }:
let
  lib = import "${nixpkgs}/lib";
  tests = import ../../nixos-tests/names.nix;
  self.nixosModules = {
    builder = ../../modules/builder.nix;
    client = ../../modules/client.nix;
    default = ../../modules;
  };

  # The test driver adds qemu-vm.nix to every node (nixos/lib/testing); the
  # nodes set its options (virtualisation.memorySize, ...). A partial NixOS
  # without that file gets a loose stand-in for its options instead.
  qemuVm = "${nixpkgs}/nixos/modules/virtualisation/qemu-vm.nix";
  vmModule =
    if builtins.pathExists qemuVm then
      qemuVm
    else
      {
        options.virtualisation = lib.mkOption {
          type = lib.types.attrsOf lib.types.unspecified;
          default = { };
        };
      };

  inherit (import ./config-facts.nix lib) failed etcText;
  etcEntry = config: file: {
    inherit (config.environment.etc.${file}) mode;
    source = baseNameOf (toString config.environment.etc.${file}.source);
  };
  present = config: files: lib.filter (f: config.environment.etc ? ${f}) files;

  node =
    hostName: module:
    let
      config =
        (import ./eval-example.nix {
          inherit nixpkgs hostName;
          example = module;
          extraModules = [ vmModule ];
          nixfarmModules = [ ];
        }).config;
      units = lib.filter (u: config.systemd.services ? ${u}) [
        "nixfarm-agent"
        "nixfarm-dispatch"
      ];
    in
    {
      failedAssertions = failed config;
      inherit (config) warnings;
      roles = lib.filter (r: config.services.nixfarm.${r}.enable or false) [
        "builder"
        "client"
      ];
      builderName = config.services.nixfarm.builder.name or null;
      nixConf = etcText config "nix/nix.conf";
      etc = lib.genAttrs (present config [
        "ssh/ssh_host_ed25519_key"
        "nix/nixfarm_ed25519"
        "nixfarm-test/monitor_ed25519"
        "nixfarm-test/ops_ed25519"
        "nixfarm/agent.json"
        "nixfarm/inventory.json"
      ]) (etcEntry config);
      machines = if config.environment.etc ? "nix/machines" then etcText config "nix/machines" else null;
      execStart = lib.genAttrs units (u: toString config.systemd.services.${u}.serviceConfig.ExecStart);
    };
in
lib.genAttrs tests (
  test: lib.mapAttrs node (import ../../nixos-tests/${test}.nix { inherit self; }).nodes
)
