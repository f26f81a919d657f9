# checks.<system>.unit-tests: the repository's pytest suite against the
# built package. The farm-harness tests skip themselves here (the build
# sandbox is not root); the Nix-evaluation tests run in their own checks, and
# test_vm_tests.py checks nixos-tests/, which is not in this check's source
# (the VM tests are checks of their own).
{
  lib,
  runCommand,
  python3,
  nixfarm,
}:
let
  python = python3.withPackages (
    ps:
    nixfarm.passthru.pythonDependencies ps
    ++ [
      ps.pytest
      ps.prometheus-client
    ]
  );
  src = lib.fileset.toSource {
    root = ../..;
    fileset = lib.fileset.fileFilter (file: file.hasExt "py" || file.hasExt "nix") ../../tests;
  };
in
runCommand "nixfarm-unit-tests-${nixfarm.version}"
  {
    nativeBuildInputs = [
      python
      nixfarm
    ];
  }
  ''
    cp -r ${src}/tests tests
    chmod -R u+w tests
    export HOME=$TMPDIR PYTHONPATH=${nixfarm}/${python3.sitePackages}
    python -m pytest -p no:cacheprovider tests \
      --ignore=tests/test_nix_lib.py \
      --ignore=tests/test_nix_modules.py \
      --ignore=tests/test_nix_parse.py \
      --ignore=tests/test_vm_tests.py
    touch $out
  ''
