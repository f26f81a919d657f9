# offload: a client and two builders, as in the README's quick start. A build
# from the client runs on a builder; the client reads the builders' metrics
# over SSH with its key; `nixfarm status` shows both healthy.
{ self }:
let
  builder = {
    imports = [
      self.nixosModules.builder
      ./node.nix
    ];
    services.nixfarm.builder.enable = true; # name: the node's host name
  };
in
{
  nodes = {
    client = {
      imports = [
        self.nixosModules.client
        ./node.nix
      ];
      services.nixfarm.client = {
        enable = true;
        sshKey = "/etc/nix/nixfarm_ed25519";
        # The dispatcher is on by default: Nix reads its machines file.
      };
    };
    builder1 = builder;
    builder2 = builder;
  };
}
