# Rewrites citations of the documents that used to live beside the repository (../shared/) into
# citations of the repository's own copies in docs/ and nixbuild-core/tests/data/. Comment-only
# and idempotent: running it again changes nothing. Apply it to every tracked file that cites
# them (from the repository's root):
#
#   git grep -lzE 'spec §|spec.s §|spec C\.|spec/sandbox\.md|DESIGN\.md|shared/traces/' \
#       -- . ':!docs' ':!nixbuild-core/tests/data' ':!scripts/cite-docs.sed' \
#     | xargs -0r sed -i -f scripts/cite-docs.sed
s#\(\.\./\)*shared/traces/#nixbuild-core/tests/data/traces/#g
s#\(\.\./\)*shared/DESIGN\.md#docs/design.md#g
s#\([^/]\|^\)DESIGN\.md#\1docs/design.md#g
s#\(\.\./\)*\(shared/\)\{0,1\}spec/sandbox\.md#docs/sandbox.md#g
s#\bspec's §#docs/serve-protocol.md §#g
s#\bspec §#docs/serve-protocol.md §#g
s#\bspec C\.#docs/sandbox.md C.#g
