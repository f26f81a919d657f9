# offload: a client and two builders, as in the README's quick start. A build
# from the client runs on a builder; the client reads the builders' metrics
# over SSH with its key; `nixfarm status` shows both healthy.
{ self }:
let
  node = import ./nodes.nix { inherit self; };
in
{
  nodes = {
    # The dispatcher is on by default: Nix reads its machines file.
    client = node.client { };
    builder1 = node.builder { };
    builder2 = node.builder { };
  };
}
