# gateway: what a client key can and cannot do on a builder. With the client's
# key, a shell, `sh -c id`, port forwarding and a pty are refused and
# `nix-daemon --stdio` (and the legacy `nix-store --serve`) work; a
# metrics-role key reads metrics but cannot build.
{ self }:
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
        builders = [ "builder1" ];
        # Only the builder's gateway is under test: Nix's static machines file.
        dispatcher.enable = false;
      };
    };
    builder1 = {
      imports = [
        self.nixosModules.builder
        ./node.nix
      ];
      services.nixfarm.builder.enable = true;
    };
  };
}
