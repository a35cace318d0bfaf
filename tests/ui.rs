//! Compile-time behaviour of `#[cluster::main]` and `#[cluster::message]`: the `fail/` cases
//! must not build and must report the error recorded in their `.stderr`; the `pass/` cases must
//! build and run to completion. Regenerate the `.stderr` files with `TRYBUILD=overwrite` and read
//! the diff.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("ui-tests/fail/*.rs");
    t.pass("ui-tests/pass/*.rs");
}
