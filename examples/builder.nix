# A builder of the farm in examples/farm.nix. Import it next to
# nixfarm.nixosModules.default (see modules/README.md), then
# `nixos-rebuild switch`.
{
  services.nixfarm.farm = import ./farm.nix;

  services.nixfarm.builder = {
    enable = true;
    # Its entry in farm.nix (default: networking.hostName). Sizes, build
    # slots and features come from there; override them here if needed.
    name = "big";
    # Keep sshd, the agent and the rest of the machine alive when builds
    # use all memory: builds are held to 90% and are the first OOM victims.
    memoryMax = "90%";
  };
}
