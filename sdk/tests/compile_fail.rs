//! Wrong calls are compile errors, with messages a user can act on.

#[test]
fn wrong_calls_do_not_compile() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
