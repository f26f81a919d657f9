"""What runs on a client: the dispatcher and its slot locks, SSH connections and
masters to the builders, the farm inventory, `nixfarm status`, `doctor`, `builds`,
`usage` and `sign-store`."""
