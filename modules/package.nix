# The `nixfarm` program (agent/): agent, gateway, metrics and dispatcher.
# Used by the flake (packages, overlay) and as the modules' default package.
{
  lib,
  python3Packages,
}:
let
  pyproject = lib.importTOML ../agent/pyproject.toml;
  # Also used by the dev shell and the unit-test check.
  dependencies =
    ps: with ps; [
      asyncssh
      pyroute2
      # `nixfarm status` draws its table with rich.
      rich
      # Optional at run time (the agent falls back to cgroup files and plain
      # sd_notify), but on NixOS systemd and D-Bus are always there.
      pydbus
      # Named `systemd` until nixpkgs renamed it to `systemd-python` (late 2025).
      (ps.systemd-python or ps.systemd)
    ];
in
python3Packages.buildPythonApplication {
  pname = pyproject.project.name;
  # Read once from pyproject.toml, so the version has one source of truth.
  inherit (pyproject.project) version;
  pyproject = true;

  # Only what the wheel needs: a change to tests/ or bench/ does not rebuild it.
  src = lib.fileset.toSource {
    root = ../agent;
    fileset = lib.fileset.unions [
      ../agent/pyproject.toml
      (lib.fileset.fileFilter (file: file.hasExt "py") ../agent/nixfarm)
    ];
  };

  build-system = [ python3Packages.setuptools ];

  dependencies = dependencies python3Packages;

  # A function of the Python package set; `dependencies` itself is taken.
  passthru.pythonDependencies = dependencies;

  # The unit tests live in the repository's tests/ (outside agent/) and run
  # in checks.<system>.unit-tests; here we only check that it imports, each
  # side's subpackage included (pyproject.toml lists them one by one).
  pythonImportsCheck = [
    "nixfarm"
    "nixfarm.cli"
    "nixfarm.builder.gateway"
    "nixfarm.builder.agent"
    "nixfarm.client.dispatch"
    "nixfarm.client.status"
    "nixfarm.client.doctor"
  ];

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.mit;
    mainProgram = "nixfarm";
    platforms = lib.platforms.linux;
  };
}
