# The farm of the VM tests, in the style of examples/farm.nix: every node
# imports it (node.nix). The keys are test-only (keys/README.md).
{
  # No `trust`: the default, builders that do not trust the clients' Nix; what
  # reaches them must be signed.

  clients = {
    # keys/client.pub: the client's own key, as services.nixfarm.client.sshKey.
    client = {
      publicKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII3ywFT1Eb+1JHq4sRlWDpSQPSGIF85Zw7ZQT1hBtOXy nixfarm-vm-test-only-client";
      # keys/client_signing.pub: the builders trust what the client's Nix signs with it.
      signingKey = "nixfarm-vm-test-only-client:46lUrqX2BH1nXPhgJ0L1uZASsUESBrs5hCL8iY+Z554=";
    };
    # keys/monitor.pub: read-only metrics (the gateway test: it cannot build).
    monitor = {
      publicKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINQM2lB9JYa+203+bvck/OxdF18ZBZXddxrISr+5O+dH nixfarm-vm-test-only-monitor";
      role = "metrics";
    };
    # keys/ops.pub: may also run the builders' GC (nixfarm gc --now).
    ops = {
      publicKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICMN4R+jqwA63UtDsktLfCZUoGcuYPB/htAkwvwY7qVw nixfarm-vm-test-only-ops";
      signingKey = "nixfarm-vm-test-only-ops:RGgSUvuVUuxCQwbgsHpLV6drfYOL2j+Msm3PAYdG4VE="; # not used: every key that may build has one
      role = "admin";
    };
  };

  builders = {
    builder1 = {
      # The test driver puts every node's name in /etc/hosts.
      hostName = "builder1";
      # keys/builder1_host.pub
      hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEB11/0p5+qbB87CRagxlBRYF7WkBObOtZK6bMtOqOm7";
      systems = [ "x86_64-linux" ];
      maxJobs = 2;
      minFree = "64M";
      maxFree = "128M";
    };
    builder2 = {
      hostName = "builder2";
      # keys/builder2_host.pub
      hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILSNEBdus834j7C/VwjYNwPTBSA/J+UBRDpopSP5K91V";
      systems = [ "x86_64-linux" ];
      maxJobs = 2;
      minFree = "64M";
      maxFree = "128M";
    };
  };
}
