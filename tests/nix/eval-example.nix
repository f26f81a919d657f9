# Evaluates one of examples/ (or a VM test node: tests/nix/vm-node-facts.nix)
# as a NixOS machine with nixpkgs' eval-config.nix.
# Used by the flake's checks and by tests/test_nix_modules.py (NIXPKGS=...).
{
  nixpkgs,
  example,
  hostName,
  system ? "x86_64-linux",
  extraModules ? [ ],
  # The VM tests' nodes import the one role's module they use themselves.
  nixfarmModules ? [ ../../modules ],
}:
import "${nixpkgs}/nixos/lib/eval-config.nix" {
  system = null; # set modularly below
  modules = nixfarmModules ++ [
    example
    {
      imports = extraModules;
      nixpkgs.hostPlatform = system;
      networking.hostName = hostName;
      # Just enough of a machine for system.build.toplevel to evaluate.
      fileSystems."/" = {
        device = "/dev/vda";
        fsType = "ext4";
      };
      boot.loader.grub.device = "nodev";
      system.stateVersion = "25.05";
    }
  ];
}
