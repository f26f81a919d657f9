# The NixOS VM tests (nixos-test-driver), as the flake's
# checks.x86_64-linux.<name>: flake.nix imports this file with { pkgs, self }.
# Each test is <name>.nix (its nodes, a function of `self`) and <name>.py
# (its script, run after helpers.py). README.md says how to run them.
{ pkgs, self }:
let
  inherit (pkgs) lib;

  names = import ./names.nix;

  runTest =
    name:
    pkgs.testers.runNixOSTest {
      imports = [ (import ./${name}.nix { inherit self; }) ];
      inherit name;
      # helpers.py first: the typed helpers every test script uses.
      testScript = builtins.readFile ./helpers.py + "\n" + builtins.readFile ./${name}.py;
    };

  # Option-doc warnings as errors. buildbot-nix sets
  # `defaults.documentation.nixos.options.warningsAreErrors = true` in its VM
  # tests, but the test framework turns the NixOS manual off in every node
  # (nixos/lib/testing/nixos-test-base.nix: documentation.nixos.enable =
  # false), so nothing is built there to fail. Instead, build the options
  # JSON of nixfarm's own modules the way the manual does
  # (nixos/lib/make-options-doc), where warningsAreErrors fails the build on
  # an option without a description or a default that needs defaultText.
  optionDocs =
    let
      eval = import (pkgs.path + "/nixos/lib/eval-config.nix") {
        system = null;
        modules = [
          self.nixosModules.default
          { nixpkgs.hostPlatform = pkgs.stdenv.hostPlatform.system; }
        ];
      };
    in
    (pkgs.nixosOptionsDoc {
      options = eval.options.services.nixfarm;
      warningsAreErrors = true;
    }).optionsJSON;

  # The VM tests: the farm's builders are x86_64-linux (farm.nix), and so are
  # the machines with KVM these run on.
  vmTests = lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux") (
    lib.genAttrs names runTest
  );
in
vmTests // { option-docs = optionDocs; }
