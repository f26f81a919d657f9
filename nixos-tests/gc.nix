# gc: a builder with a small store and min-free/max-free set. Remote builds
# fill it; the agent brings free space back above max-free, oldest paths
# first, a rooted path survives, and builds keep succeeding. An admin key
# starts a pass on demand through the gateway and the agent's control socket.
{ self }:
let
  node = import ./nodes.nix { inherit self; };
in
{
  nodes = {
    client = node.client {
      builders = [ "builder1" ];
      # Only the builder's GC is under test: Nix's static machines file.
      dispatcher.enable = false;
    };
    builder1 = node.builder {
      builder = {
        # Nix's own min-free/max-free (nix.conf), far below the agent's: Nix
        # also collects inside a build below its min-free, and the pass this
        # test checks must be the agent's.
        minFree = "32M";
        maxFree = "64M";
        # The agent's own limits (agent.json keys; bytes, sizes or %).
        settings = {
          min_free = "160M";
          max_free = "256M";
        };
      };
      # A small store: the writable layer of the VM's /nix/store is this tmpfs
      # (nixos/modules/virtualisation/qemu-vm.nix), and deleting a path built
      # in the VM frees its space there.
      machine.virtualisation.fileSystems."/nix/.rw-store".options = [ "size=384M" ];
    };
  };
}
