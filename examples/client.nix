# A client of the farm in examples/farm.nix. First, as root:
#   ssh-keygen -t ed25519 -N "" -f /etc/nix/nixfarm_ed25519
# and put the .pub line into farm.nix under clients.laptop.publicKey.
{
  services.nixfarm.farm = import ./farm.nix;

  services.nixfarm.client = {
    enable = true;
    name = "laptop"; # its entry in farm.nix (default: networking.hostName)
    sshKey = "/etc/nix/nixfarm_ed25519";
  };
}
