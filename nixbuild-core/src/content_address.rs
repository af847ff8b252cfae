//! Content addresses (`ca` strings, spec §6.4) and the methods fixed-output derivations use.
