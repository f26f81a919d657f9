# What every node of the VM tests shares besides nixfarm's own modules: the
# test farm and a Nix that never waits on the network. Each role's keys are
# put in place by nodes.nix, which knows the role: a node imports only its
# own role's module, so it cannot read the other role's options here.
# Nothing here configures what the modules configure (users, sshd, nix.conf's
# farm settings, the agent and dispatcher units): the tests check the modules
# as a user gets them.
{ lib, ... }:
{
  services.nixfarm.farm = import ./farm.nix;

  # The VMs have no route to a binary cache: without this every build first
  # waits for substituters that cannot answer.
  nix.settings.substituters = lib.mkForce [ ];
}
