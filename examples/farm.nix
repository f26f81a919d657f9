# The farm, described once: every machine imports this file, the builders
# to authorize the clients, the clients to reach the builders.
# (Example keys: replace them with your machines' own.)
{
  # By default builders do not trust their clients (Nix 2.16 or later on every
  # machine): what a client sends must be signed with its signingKey below, and
  # a stolen client key (a CI runner's, say) does not own the builders. This
  # example farm keeps the other mode, where builders trust their clients'
  # Nix as they would root: the one for farms with a Nix older than 2.16.
  # Drop this line for the default (docs/threat-model.md).
  trust = "trusted";

  clients = {
    laptop = {
      # The contents of the client's /etc/nix/nixfarm_ed25519.pub.
      publicKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4TkkfLyZz0UD/rdVEdu9f6yclYmfgzEWKwwIyAKeko root@laptop";
      # The contents of the client's /var/lib/nixfarm-client/signing-key.pub (made
      # at its first boot): the builders accept what this client's Nix built.
      signingKey = "laptop-nixfarm-1:2C9lbTZtH4OgLE2mvlBlOhUiFqFQyLGLqMhylVeUvhE=";
    };
    ci = {
      publicKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6YsPIBkTTT2/aBdKKn5jqST+ekPWO6MoJjItL3nQ7L root@ci";
      signingKey = "ci-nixfarm-1:6/rle0MoXo/hrWuf40UuuKT8IDamFEgUHa9YcRCApgM=";
      role = "admin"; # may also control the builders' store GC
    };
  };

  builders = {
    big = {
      hostName = "big.example.org";
      # The contents of the builder's /etc/ssh/ssh_host_ed25519_key.pub.
      hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEtuygk6jgEaZbrXlkeM2sRIH/l1HPFHvkOAnOCaXrAE";
      systems = [
        "x86_64-linux"
        "i686-linux"
      ];
      features = [
        "big-parallel"
        "kvm"
        "nixos-test"
        "benchmark"
      ];
      maxJobs = 8;
      cores = 4;
      speedFactor = 2;
      minFree = "20G";
      maxFree = "100G";
    };
    small = {
      hostName = "small.example.org";
      address = "192.0.2.20";
      hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIVD/QeH8VBuzO9P38u8/KHoysiLVjYoRcWxo75QwzE3";
      systems = [ "aarch64-linux" ];
      maxJobs = 2;
      minFree = "5G";
      maxFree = "20G";
    };
  };
}
