# What tests/test_nix_modules.py asserts about the examples, as one JSON
# value: the generated files and settings of the example builder and client,
# and the failed assertions of deliberately broken variants.
# nix-instantiate --eval --strict --json tests/nix/example-facts.nix --argstr nixpkgs $NIXPKGS
{ nixpkgs }:
let
  lib = import "${nixpkgs}/lib";
  nixfarmLib = import ../../modules/lib.nix;
  farm = import ../../examples/farm.nix;

  machine =
    name: hostName: extraModules:
    (import ./eval-example.nix {
      inherit nixpkgs hostName extraModules;
      example = ../../examples/${name}.nix;
    }).config;

  inherit (import ./config-facts.nix lib) failed etcText;

  builder = machine "builder" "big" [ ];
  client = machine "client" "laptop" [ ];
  trustDefault =
    (import ./eval-example.nix {
      inherit nixpkgs;
      hostName = "big";
      example = ../../examples/builder.nix;
    }).options.services.nixfarm.farm.trust.default;
  user = builder.services.nixfarm.builder.user;
in
{
  builder = {
    failedAssertions = failed builder;
    inherit (builder) warnings;
    user = {
      name = user;
      inherit (builder.users.users.${user})
        isSystemUser
        useDefaultShell
        hashedPassword
        group
        ;
      authorizedKeys = builder.users.users.${user}.openssh.authorizedKeys.keys;
    };
    authorizedKeysFile = etcText builder "ssh/authorized_keys.d/${user}";
    nixConf = etcText builder "nix/nix.conf";
    settings = {
      inherit (builder.nix.settings)
        min-free
        max-free
        max-jobs
        cores
        trusted-users
        system-features
        ;
    };
    nrBuildUsers = builder.nix.nrBuildUsers;
    sshdExtraConfig = builder.services.openssh.extraConfig;
    opensshEnabled = builder.services.openssh.enable;
    nixDaemon = builder.systemd.services.nix-daemon.serviceConfig;
    agent = {
      inherit (builder.systemd.services.nixfarm-agent) wantedBy environment;
      serviceConfig = builder.systemd.services.nixfarm-agent.serviceConfig;
      path = map toString builder.systemd.services.nixfarm-agent.path;
    };
    agentSettings = builder.services.nixfarm.builder.settings;
    package = "${builder.services.nixfarm.builder.package}";
  };

  client = {
    failedAssertions = failed client;
    inherit (client) warnings;
    machines = client.environment.etc."nix/machines".text;
    expectedMachines = lib.concatMapStrings (
      b: nixfarmLib.machinesLine (b // { sshKey = "/etc/nix/nixfarm_ed25519"; }) + "\n"
    ) (lib.attrValues farm.builders);
    nixConf = etcText client "nix/nix.conf";
    settings = {
      inherit (client.nix.settings) builders builders-use-substitutes;
    };
    distributedBuilds = client.nix.distributedBuilds;
    sshConfig = client.environment.etc."ssh/ssh_config".text;
    knownHosts = client.environment.etc."ssh/ssh_known_hosts".text;
    dispatcher = client.systemd.services.nixfarm-dispatch.serviceConfig;
    dispatcherEnvironment = client.systemd.services.nixfarm-dispatch.environment;
    masters = client.systemd.services.nixfarm-ssh-masters.serviceConfig;
    tmpfiles = client.systemd.tmpfiles.rules;
    inventory = client.environment.etc."nixfarm/inventory.json".source.value or null;
  };

  # Builders that do not trust their clients (services.nixfarm.farm.trust).
  untrusted =
    let
      # The example farm sets "trusted"; this is the default it overrides.
      farmUntrusted = {
        services.nixfarm.farm.trust = lib.mkForce trustDefault;
      };
      builder = machine "builder" "big" [ farmUntrusted ];
      client = machine "client" "laptop" [ farmUntrusted ];
      unsigned = machine "builder" "big" [
        farmUntrusted
        { services.nixfarm.farm.clients.ci.signingKey = lib.mkForce null; }
      ];
      oldNix = role: host: machine role host [
        farmUntrusted
        { nix.package = lib.mkForce (builder.nix.package // { version = "2.15.3"; }); }
      ];
      signingUnit = client.systemd.services.nixfarm-signing-key;
    in
    {
      default = trustDefault;
      builder = {
        failedAssertions = failed builder;
        inherit (builder) warnings;
        nixConf = etcText builder "nix/nix.conf";
      };
      client = {
        failedAssertions = failed client;
        inherit (client) warnings;
        nixConf = etcText client "nix/nix.conf";
        inventory = client.environment.etc."nixfarm/inventory.json".source.value or null;
        signingUnit = {
          inherit (signingUnit) wantedBy before requiredBy;
          inherit (signingUnit.serviceConfig) Type RemainAfterExit;
          script = signingUnit.serviceConfig.ExecStart.text or "";
        };
      };
      unsignedWarnings = unsigned.warnings;
      sshBuilderClient = failed (
        machine "client" "laptop" [
          farmUntrusted
          { services.nixfarm.farm.builders.small.protocol = "ssh"; }
        ]
      );
      oldNixBuilder = failed (oldNix "builder" "big");
      oldNixClient = failed (oldNix "client" "laptop");
      trustedBuilderConf = etcText (machine "builder" "big" [ ]) "nix/nix.conf";
    };

  # The Prometheus endpoint on, on every address, open in the firewall.
  prometheus =
    let
      c = machine "builder" "big" [
        {
          services.nixfarm.builder = {
            prometheus = {
              enable = true;
              listenAddress = "::";
              port = 9100;
              openFirewall = true;
            };
            shareClientNames = true;
          };
        }
      ];
    in
    {
      failedAssertions = failed c;
      settings = c.services.nixfarm.builder.settings;
      firewall = c.networking.firewall.allowedTCPPorts;
      addressFamilies = c.systemd.services.nixfarm-agent.serviceConfig.RestrictAddressFamilies;
    };

  # A feature both supported and mandatory: nixpkgs writes the line from
  # nix.buildMachines, our dispatcher from machinesLine; they must agree.
  overlap =
    let
      c = machine "client" "laptop" [
        { services.nixfarm.farm.builders.big.mandatoryFeatures = [ "big-parallel" ]; }
      ];
    in
    {
      machines = c.environment.etc."nix/machines".text;
      expectedMachines = lib.concatMapStrings (
        b: nixfarmLib.machinesLine (b // { sshKey = "/etc/nix/nixfarm_ed25519"; }) + "\n"
      ) (lib.attrValues c.services.nixfarm.farm.builders);
    };

  broken = {
    client = failed (
      machine "client" "laptop" [
        {
          services.nixfarm.client.sshKey = lib.mkForce null;
          services.nixfarm.client.builders = lib.mkForce [ "nosuch" ];
        }
      ]
    );
    builder = failed (
      machine "builder" "big" [
        {
          services.nixfarm.builder.name = lib.mkForce "nosuch";
          services.nixfarm.builder.minFree = "200G";
          services.nixfarm.farm.builders.big.minFree = lib.mkForce "1T";
        }
      ]
    );
  };
}
