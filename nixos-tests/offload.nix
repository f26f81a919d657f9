# offload: a client and two builders, as in the README's quick start. A build
# from the client runs on a builder; the client reads the builders' metrics
# over SSH with its key; `nixfarm status` shows both healthy; the builders
# account the builds to the client, and builder1's Prometheus endpoint too.
{ self }:
let
  node = import ./nodes.nix { inherit self; };
in
{
  nodes = {
    # The dispatcher is on by default: Nix reads its machines file.
    client = node.client { };
    # builder1 also serves Prometheus metrics, to the client (the test scrapes them).
    builder1 = node.builder {
      builder.prometheus = {
        enable = true;
        openFirewall = true;
      };
    };
    builder2 = node.builder { };
  };
}
