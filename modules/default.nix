# nixosModules.default: both roles (each is off until enabled), one inventory.
{
  imports = [
    ./builder.nix
    ./client.nix
  ];
}
