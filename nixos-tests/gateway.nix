# gateway: what a client key can and cannot do on a builder. With the client's
# key, a shell, `sh -c id`, port forwarding and a pty are refused and
# `nix-daemon --stdio` (and the legacy `nix-store --serve`) work; a
# metrics-role key reads metrics but cannot build.
{ self }:
let
  node = import ./nodes.nix { inherit self; };
in
{
  nodes = {
    client = node.client {
      builders = [ "builder1" ];
      # Only the builder's gateway is under test: Nix's static machines file.
      dispatcher.enable = false;
    };
    builder1 = node.builder { };
  };
}
