# Pure helpers shared by the builder and client modules.
#
# Only builtins: no nixpkgs, so tests/test_nix_lib.py evaluates this file with
# a bare `nix-instantiate --eval --strict --json` on good and bad inputs.
# Functions that can fail on user input come in two forms: `xError` returns
# null or a message naming the problem (for assertions), `x` throws it.
let
  inherit (builtins)
    attrNames
    bitAnd
    bitOr
    concatLists
    concatStringsSep
    elem
    elemAt
    filter
    foldl'
    genList
    head
    isInt
    isString
    listToAttrs
    match
    stringLength
    substring
    toJSON
    ;

  mapAttrsToList = f: attrs: map (name: f name attrs.${name}) (attrNames attrs);

  unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];

  # Elements that occur more than once, each once.
  count = x: list: builtins.length (filter (y: y == x) list);
  duplicates = list: unique (filter (x: count x list > 1) list);

  # Nix reads sizes as bytes or with one of these suffixes, powers of 1024
  # (string2IntWithUnitPrefix in Nix's libutil).
  sizeUnits = {
    "" = 1;
    K = 1024;
    M = 1024 * 1024;
    G = 1024 * 1024 * 1024;
    T = 1024 * 1024 * 1024 * 1024;
  };

  sizeMatch = s: match "([0-9]+)([KMGT]?)" s;

  # Decimal digits to an int without fromJSON (which rejects leading zeros).
  digitValues = listToAttrs (
    genList (i: {
      name = toString i;
      value = i;
    }) 10
  );
  digits = s: genList (i: digitValues.${substring i 1 s}) (stringLength s);
  parseDigits = s: foldl' (acc: d: acc * 10 + d) 0 (digits s);

  # Largest byte count we accept: 2^62, far above any disk and safely inside
  # Nix's signed 64-bit integers.
  maxSize = 4611686018427387904;

  sizeError =
    value:
    let
      m = sizeMatch value;
      digits = head m;
      unit = sizeUnits.${elemAt m 1};
    in
    if isInt value then
      (if value < 0 then "size ${toString value} is negative" else null)
    else if !(isString value) then
      "size must be an integer (bytes) or a string such as \"10G\", not a ${builtins.typeOf value}"
    else if m == null then
      ''size "${value}" is not bytes or a number with K, M, G or T (powers of 1024), e.g. "10G"''
    # 19 digits could overflow before the comparison; 2^62 has 19 digits too.
    else if stringLength digits > 18 || parseDigits digits > maxSize / unit then
      ''size "${value}" is too large''
    else
      null;

  parseSize =
    value:
    let
      err = sizeError value;
      m = sizeMatch value;
    in
    if err != null then
      throw "nixfarm: ${err}"
    else if isInt value then
      value
    else
      parseDigits (head m) * sizeUnits.${elemAt m 1};

  # base64 (RFC 4648, with padding) of an ASCII string. Nix has no builtin
  # for it; Nix's machines file wants the builder's host key this way.
  printable =
    " !\"#$%&'()*+,-./0123456789:;<=>?@"
    + "ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`"
    + "abcdefghijklmnopqrstuvwxyz{|}~";
  asciiCodes = listToAttrs (
    genList (i: {
      name = substring i 1 printable;
      value = i + 32;
    }) (stringLength printable)
  );
  b64Alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  b64Char = i: substring i 1 b64Alphabet;

  # (Nix strings are bytes: a non-ASCII character would show as half a character.)
  charCode = c: asciiCodes.${c} or (throw "nixfarm: base64Encode handles printable ASCII only");

  base64Encode =
    s:
    let
      len = stringLength s;
      codes = genList (i: charCode (substring i 1 s)) len;
      groups = (len + 2) / 3;
      byteAt = i: if i < len then elemAt codes i else 0;
      group =
        g:
        let
          i = g * 3;
          n = bitOr (bitOr (byteAt i * 65536) (byteAt (i + 1) * 256)) (byteAt (i + 2));
          present = len - i; # 1, 2, or 3 (or more) input bytes in this group
          sextet = k: bitAnd (n / (pow64 k)) 63;
        in
        b64Char (sextet 3)
        + b64Char (sextet 2)
        + (if present > 1 then b64Char (sextet 1) else "=")
        + (if present > 2 then b64Char (sextet 0) else "=");
      pow64 =
        k:
        if k == 0 then
          1
        else if k == 1 then
          64
        else if k == 2 then
          4096
        else
          262144;
    in
    concatStringsSep "" (genList group groups);

  # What an inventory entry means when it leaves a field out; inventory.nix
  # uses the same values as its option defaults.
  builderDefaults = {
    address = null;
    port = 22;
    sshUser = "nixfarm";
    protocol = "ssh-ng";
    features = [ ];
    mandatoryFeatures = [ ];
    maxJobs = 1;
    cores = 0;
    speedFactor = 1;
    minFree = "5G";
    maxFree = "20G";
  };
  clientDefaults = {
    role = "build";
  };

  # The same names `nixfarm gateway` accepts for --client (gateway.py: _CLIENT_NAME).
  clientNameRegex = "[A-Za-z0-9][A-Za-z0-9._-]{0,63}";
  roles = [
    "build"
    "metrics"
    "admin"
  ];
  protocols = [
    "ssh"
    "ssh-ng"
  ];
  # Accounts as shadow's is_valid_name (and nixpkgs' users-groups.nix) accept them.
  userNameRegex = "[a-zA-Z0-9_.][a-zA-Z0-9_.-]*";

  # One OpenSSH public key: type, base64 blob, optional comment. No options
  # prefix and no newline, so a key can never smuggle `command=` or a second
  # line into authorized_keys.
  keyTypes = concatStringsSep "|" [
    "ssh-ed25519"
    "ssh-rsa"
    "ecdsa-sha2-nistp(256|384|521)"
    "sk-ssh-ed25519@openssh.com"
    "sk-ecdsa-sha2-nistp256@openssh.com"
  ];
  publicKeyRegex = "(${keyTypes}) [A-Za-z0-9+/]+={0,3}( [ -~]*)?";

  publicKeyError =
    what: key:
    let
      expected = ''one OpenSSH public key line ("ssh-ed25519 AAAA... comment")'';
    in
    if !(isString key) then
      "${what} must be a string"
    else if match publicKeyRegex key == null then
      "${what} is not ${expected}: ${toJSON key}"
    else
      null;

  # "type blob" without the comment, as known_hosts entries want it.
  keyOnly =
    key:
    let
      m = match "([^ ]+ [^ ]+).*" key;
    in
    if m == null then key else head m;

  # restrict: no forwarding, no pty, no ~/.ssh/rc; command=: the only thing the
  # key can run is the gateway, which execs the Nix protocol for its role.
  authorizedKeysLine =
    {
      nixfarm,
      name,
      role ? clientDefaults.role,
      publicKey,
    }:
    let
      err =
        if !(isString name) || match clientNameRegex name == null then
          "client name ${toJSON name} must match ${clientNameRegex}"
        else if !(elem role roles) then
          "client ${name}: role ${toJSON role} is not one of ${concatStringsSep ", " roles}"
        else
          publicKeyError "client ${name}: publicKey" publicKey;
    in
    if err != null then
      throw "nixfarm: ${err}"
    else
      ''restrict,command="${nixfarm}/bin/nixfarm ${gatewayArgs name role}" ${publicKey}'';

  gatewayArgs = name: role: "gateway --client ${name} --role ${role}";

  featuresNotMandatory = b: filter (f: !elem f b.mandatoryFeatures) b.features;

  listOrDash = l: if l == [ ] then "-" else concatStringsSep "," l;

  # One line of Nix's machines file (nix.conf(5), "builders"): URI, systems,
  # key, max jobs, speed factor, supported features, mandatory features,
  # base64 host key. Supported features include the mandatory ones, after
  # the others, as nixpkgs' nix-remote-build.nix writes them from
  # nix.buildMachines (which gets the others only: client.nix).
  machinesLine =
    entry:
    let
      b =
        builderDefaults
        // {
          sshKey = null;
          hostKey = null;
        }
        // entry;
    in
    concatStringsSep " " [
      "${b.protocol}://${b.sshUser}@${b.hostName}"
      (listOrDash b.systems)
      (if b.sshKey == null then "-" else b.sshKey)
      (toString b.maxJobs)
      (toString b.speedFactor)
      (listOrDash (featuresNotMandatory b ++ b.mandatoryFeatures))
      (listOrDash b.mandatoryFeatures)
      (if b.hostKey == null then "-" else base64Encode (keyOnly b.hostKey))
    ];

  # Names under which ssh looks the builder up in known_hosts.
  knownHostNames =
    entry:
    let
      b = builderDefaults // entry;
      address = if b.address == null then [ ] else [ b.address ];
      names = unique ([ b.hostName ] ++ address);
    in
    if b.port == 22 then names else map (n: "[${n}]:${toString b.port}") names;

  # The programs.ssh.extraConfig block for one builder, read by nix-daemon's
  # ssh (root). Keepalives make a dead link fail after interval * count
  # seconds instead of hanging a build on TCP timeouts. No `IPQoS`: ssh already
  # marks sessions without a terminal as bulk (cs1 from OpenSSH 7.8), and
  # OpenSSH 10 turns the old `IPQoS throughput` into no marking at all
  # (`ssh -G`: "ipqos none none"; checked with 10.0p2, tests/client/test_ssh_sharing.py).
  #
  # With `controlDir`, root's ssh keeps one connection per builder open for
  # `controlPersist` seconds after its last session and runs every build's
  # session over it: Nix's hook opens a new SSH connection for each build,
  # and the handshake is most of the time a build waits to start
  # (bench/README.md, "Results: with connection sharing"). `Match
  # originalhost`: the name as Nix gives it, before HostName; `localuser
  # root`: only nix-daemon's ssh, since nobody else may use the directory
  # (ssh exits when it cannot make its socket).
  sshHostBlock =
    {
      builder,
      sshKey,
      connectTimeout ? 10,
      serverAliveInterval ? 60,
      serverAliveCountMax ? 3,
      controlDir ? null,
      controlPersist ? 60,
    }:
    let
      b = builderDefaults // builder;
    in
    concatStringsSep "\n" (
      [ "Host ${b.hostName}" ]
      ++ (if b.address == null then [ ] else [ "  HostName ${b.address}" ])
      ++ [
        "  Port ${toString b.port}"
        "  User ${b.sshUser}"
        "  IdentityFile ${sshKey}"
        "  IdentitiesOnly yes"
        "  ConnectTimeout ${toString connectTimeout}"
        "  ServerAliveInterval ${toString serverAliveInterval}"
        "  ServerAliveCountMax ${toString serverAliveCountMax}"
      ]
      ++ (
        if controlDir == null then
          [ ]
        else
          [
            "Match originalhost ${b.hostName} localuser root"
            "  ControlMaster auto"
            # %C: a hash of the local host, remote host, port and user.
            "  ControlPath ${controlDir}/%C"
            "  ControlPersist ${toString controlPersist}"
          ]
      )
    )
    + "\n";

  clientErrors =
    name: entry:
    let
      c = clientDefaults // entry;
      opt = "services.nixfarm.farm.clients.${toJSON name}";
      keyErr = publicKeyError "${opt}.publicKey" (c.publicKey or null);
    in
    filter (e: e != null) [
      (
        if match clientNameRegex name == null then
          "${opt}: the name must match ${clientNameRegex} (`nixfarm gateway --client` takes it)"
        else
          null
      )
      (
        if elem c.role roles then
          null
        else
          "${opt}.role: ${toJSON c.role} is not one of ${concatStringsSep ", " roles}"
      )
      (if keyErr == null then null else "${keyErr}; use the line of the client's key .pub file")
    ];

  builderErrors =
    name: entry:
    let
      b = builderDefaults // entry;
      opt = "services.nixfarm.farm.builders.${toJSON name}";
      minErr = sizeError b.minFree;
      maxErr = sizeError b.maxFree;
      keyErr = publicKeyError "${opt}.hostKey" (b.hostKey or null);
    in
    filter (e: e != null) [
      (
        if (b.hostName or "") == "" then
          "${opt}.hostName is empty: set the name clients connect to"
        else
          null
      )
      (
        if (b.systems or [ ]) == [ ] then
          ''${opt}.systems is empty: list what it builds, e.g. [ "x86_64-linux" ]''
        else
          null
      )
      (
        if elem b.protocol protocols then
          null
        else
          ''${opt}.protocol: ${toJSON b.protocol} is not "ssh-ng" or "ssh"''
      )
      (
        if isString b.sshUser && match userNameRegex b.sshUser != null then
          null
        else
          "${opt}.sshUser: ${toJSON b.sshUser} is not a valid user name"
      )
      (
        if keyErr == null then
          null
        else
          "${keyErr}; take it from the builder's /etc/ssh/ssh_host_ed25519_key.pub"
      )
      (if b.maxJobs < 1 then "${opt}.maxJobs must be at least 1" else null)
      (if b.cores < 0 then "${opt}.cores must be 0 (all) or more" else null)
      (if b.speedFactor <= 0 then "${opt}.speedFactor must be positive" else null)
      (if minErr != null then "${opt}.minFree: ${minErr}" else null)
      (if maxErr != null then "${opt}.maxFree: ${maxErr}" else null)
      (
        if minErr == null && maxErr == null && parseSize b.minFree >= parseSize b.maxFree then
          "${opt}: minFree (${toString b.minFree}) must be below maxFree (${toString b.maxFree}); "
          + "once less than minFree is free, GC deletes until maxFree is free"
        else
          null
      )
    ];

  # Every problem with a farm inventory, as messages that name the option and
  # the fix; [ ] when it is fine. Takes raw attrsets (missing fields mean the
  # defaults above), so it is testable without the module system.
  checkInventory =
    farm:
    let
      clients = farm.clients or { };
      builders = farm.builders or { };
      hostNames = filter (h: h != "") (mapAttrsToList (_: b: b.hostName or "") builders);
      keys = map keyOnly (filter isString (mapAttrsToList (_: c: c.publicKey or null) clients));
    in
    concatLists (mapAttrsToList clientErrors clients)
    ++ concatLists (mapAttrsToList builderErrors builders)
    ++ map dupHostError (duplicates hostNames)
    ++ map dupKeyError (duplicates keys);

  dupHostError =
    h: "services.nixfarm.farm.builders: host name ${h} is used by more than one builder";
  dupKeyError =
    k:
    "services.nixfarm.farm.clients: the key ${k} is listed for more than one client; "
    + "give each client its own key";
in
{
  inherit
    authorizedKeysLine
    base64Encode
    builderDefaults
    checkInventory
    featuresNotMandatory
    clientDefaults
    clientNameRegex
    keyOnly
    knownHostNames
    machinesLine
    parseSize
    publicKeyError
    roles
    sizeError
    sshHostBlock
    ;
}
