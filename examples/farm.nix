# The farm, described once: every machine imports this file, the builders
# to authorize the clients, the clients to reach the builders.
# (Example keys: replace them with your machines' own.)
{
  clients = {
    # The contents of the client's /etc/nix/nixfarm_ed25519.pub.
    laptop.publicKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4TkkfLyZz0UD/rdVEdu9f6yclYmfgzEWKwwIyAKeko root@laptop";
    ci = {
      publicKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6YsPIBkTTT2/aBdKKn5jqST+ekPWO6MoJjItL3nQ7L root@ci";
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
