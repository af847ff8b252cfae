fn main() { nixbuild_sandbox::maybe_run_helper(); }
