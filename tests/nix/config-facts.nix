# What the facts files (example-facts.nix, vm-node-facts.nix) read of an
# evaluated NixOS config.
lib: {
  # The messages of its failed assertions.
  failed = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  # A generated /etc file's text: writeText derivations keep it in `text`.
  etcText =
    config: file:
    let
      entry = config.environment.etc.${file};
    in
    entry.source.text or entry.text;
}
