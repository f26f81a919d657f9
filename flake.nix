{
  description = "nixfarm: a self-hosted Nix build farm (NixOS modules and the nixfarm agent)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # Evaluates (does not build) an example machine: forcing toplevel's
      # drvPath checks every option type and assertion; discarding the string
      # context keeps the check from building the whole system.
      evalCheck =
        pkgs: name: hostName:
        let
          machine = import ./tests/nix/eval-example.nix {
            inherit nixpkgs hostName;
            inherit (pkgs.stdenv.hostPlatform) system;
            example = ./examples/${name}.nix;
          };
          inherit (machine.config.system.build) toplevel;
          drvPath = builtins.unsafeDiscardStringContext toplevel.drvPath;
        in
        pkgs.runCommand "nixfarm-example-${name}" { } ''
          echo ${drvPath} > $out
        '';
    in
    {
      nixosModules = {
        builder = ./modules/builder.nix;
        client = ./modules/client.nix;
        default = ./modules;
      };

      overlays.default = final: _prev: {
        nixfarm = final.callPackage ./modules/package.nix { };
      };

      packages = forAllSystems (
        pkgs:
        let
          nixfarm = pkgs.callPackage ./modules/package.nix { };
        in
        {
          inherit nixfarm;
          default = nixfarm;
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (
              ps:
              (pkgs.callPackage ./modules/package.nix { }).passthru.pythonDependencies ps
              ++ [
                ps.pytest
                ps.prometheus-client
              ]
            ))
            pkgs.ruff
            pkgs.mypy
            pkgs.nixfmt-rfc-style
            pkgs.openssh
          ];
          shellHook = ''
            export PYTHONPATH="$PWD/agent''${PYTHONPATH:+:$PYTHONPATH}"
          '';
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style);

      checks = forAllSystems (
        pkgs:
        let
          nixfarm = self.packages.${pkgs.stdenv.hostPlatform.system}.nixfarm;
          nixfmt = pkgs.nixfmt-rfc-style;
          checks = {
            inherit nixfarm;
            unit-tests = pkgs.callPackage ./tests/nix/unit-tests.nix { inherit nixfarm; };
            example-builder = evalCheck pkgs "builder" "big";
            example-client = evalCheck pkgs "client" "laptop";
            formatting = pkgs.runCommand "nixfarm-formatting" { nativeBuildInputs = [ nixfmt ]; } ''
              cd ${self}
              nixfmt --check $(find . -name '*.nix' -not -path './.git/*')
              touch $out
            '';
          };
          # The NixOS VM tests (issue 7) live in nixos-tests/default.nix, a
          # function { pkgs, self } -> { <name> = <test derivation>; }.
          vmTests = lib.optionalAttrs (builtins.pathExists ./nixos-tests/default.nix) (
            import ./nixos-tests { inherit pkgs self; }
          );
        in
        checks // vmTests
      );
    };
}
