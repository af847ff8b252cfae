//! Golden tests from docs/serve-protocol.md §13.5 and §13.7, and proptests of the ATerm format.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::strategies::*;
use super::*;

fn sp(s: &str) -> StorePath {
    StorePath::from_absolute_path(s.as_bytes()).expect("valid store path")
}

const BAR_OUT: &str = "/nix/store/4q0pg5zpfmznxscq3avycvf9xdvx50n3-bar";
const BAR_HASH: &str = "08813cbee9903c62be4c5027726a418a300da4500b2d369d3af9286f4815ceba";
const BAR_DRV: &str = "/nix/store/0hm2f1psjpcwg8fijsmr4wwxrx59s092-bar.drv";
const FOO_OUT: &str = "/nix/store/5vyvcwah9l9kf07d52rcgdk70g2f4y13-foo";
const FOO_DRV: &str = "/nix/store/4wvvbi4jwn0prsdxb7vs673qa5h9gr7x-foo.drv";

/// The fixed-output `bar` of docs/serve-protocol.md §13.5 (tvix test data), written from its
/// values.
fn bar_aterm() -> String {
    format!(
        r#"Derive([("out","{BAR_OUT}","r:sha256","{BAR_HASH}")],[],[],":",":",[],[("builder",":"),("name","bar"),("out","{BAR_OUT}"),("outputHash","{BAR_HASH}"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system",":")])"#
    )
}

/// `foo` of docs/serve-protocol.md §13.5, depending on `bar`.
fn foo_aterm() -> String {
    format!(
        r#"Derive([("out","{FOO_OUT}","","")],[("{BAR_DRV}",["out"])],[],":",":",[],[("bar","{BAR_OUT}"),("builder",":"),("name","foo"),("out","{FOO_OUT}"),("system",":")])"#
    )
}

fn parse_round_trip(text: &str) -> Derivation {
    let drv = Derivation::from_aterm(text.as_bytes()).expect("parses");
    assert_eq!(
        String::from_utf8_lossy(&drv.to_aterm()),
        text,
        "print(parse(x)) == x"
    );
    drv
}

#[test]
fn fixed_output_bar() {
    let bar = parse_round_trip(&bar_aterm());
    let (path, ca) = bar.basic.fixed_output().expect("fixed output");
    assert_eq!(path, &sp(BAR_OUT));
    assert_eq!(
        ca.method,
        crate::content_address::ContentAddressMethod::Recursive
    );
    assert_eq!(ca.hash.to_base16(), BAR_HASH);
    let h = bar.hash_modulo(true, |_| None).expect("no inputs");
    assert_eq!(
        h.to_base16(),
        "724f3e3634fce4cbbbd3483287b8798588e80280660b9a63fd13a1bc90485b33"
    );
    assert_eq!(bar.basic.hash_modulo(), h);
    bar.verify_output_paths("bar", |_| None)
        .expect("paths verify");
    assert_eq!(bar.drv_path("bar").expect("valid").to_string(), BAR_DRV);
}

#[test]
fn input_addressed_foo() {
    let bar = parse_round_trip(&bar_aterm());
    let foo = parse_round_trip(&foo_aterm());
    let resolve = |p: &StorePath| (p == &sp(BAR_DRV)).then(|| bar.basic.hash_modulo());

    let masked = "Derive([(\"out\",\"\",\"\",\"\")],[(\"724f3e3634fce4cbbbd3483287b8798588e80280660b9a63fd13a1bc90485b33\",[\"out\"])],[],\":\",\":\",[],[(\"bar\",\"/nix/store/4q0pg5zpfmznxscq3avycvf9xdvx50n3-bar\"),(\"builder\",\":\"),(\"name\",\"foo\"),(\"out\",\"\"),(\"system\",\":\")])";
    let h = foo.hash_modulo(true, resolve).expect("resolves");
    assert_eq!(h, Hash::compute(HashAlgo::Sha256, masked.as_bytes()));
    assert_eq!(
        h.to_base16(),
        "24c43196ac9c7b557bc525d13d16f990f730c060ae61f9133195f1c0a2ea0d9f"
    );
    let outputs = foo.compute_output_paths("foo", resolve).expect("computes");
    assert_eq!(outputs, BTreeMap::from([("out".to_owned(), sp(FOO_OUT))]));
    foo.verify_output_paths("foo", resolve)
        .expect("paths verify");
    assert_eq!(foo.drv_path("foo").expect("valid").to_string(), FOO_DRV);

    assert_eq!(
        foo.hash_modulo(true, |_| None),
        Err(DerivationError::UnresolvedInput(sp(BAR_DRV)))
    );
    let mut wrong = foo.clone();
    wrong
        .basic
        .outputs
        .insert("out".into(), DerivationOutput::InputAddressed(sp(BAR_OUT)));
    assert_eq!(
        wrong.verify_output_paths("foo", resolve),
        Err(DerivationError::OutputPathMismatch {
            output: "out".into(),
            declared: BAR_OUT.into(),
            computed: FOO_OUT.into(),
        })
    );
}

#[test]
fn multiple_outputs() {
    // docs/serve-protocol.md §13.5 `has-multi-out`: outputs `lib` and `out`, no inputs.
    let mut basic = BasicDerivation {
        platform: b":".to_vec(),
        builder: b":".to_vec(),
        ..BasicDerivation::default()
    };
    for o in ["lib", "out"] {
        basic.outputs.insert(o.into(), DerivationOutput::Deferred);
        basic.env.insert(o.into(), Vec::new());
    }
    for (k, v) in [
        ("builder", ":"),
        ("name", "has-multi-out"),
        ("outputs", "out lib"),
        ("system", ":"),
    ] {
        basic.env.insert(k.into(), v.into());
    }
    // Nix fills the outputs from the masked hash, as `derivationStrict` does.
    let h = basic.hash_modulo();
    for o in ["lib", "out"] {
        let path = make_output_path(&h, "has-multi-out", o);
        basic.env.insert(o.into(), path.to_absolute().into_bytes());
        basic
            .outputs
            .insert(o.into(), DerivationOutput::InputAddressed(path));
    }
    let drv = Derivation {
        input_drvs: BTreeMap::new(),
        basic,
    };
    let paths = drv
        .compute_output_paths("has-multi-out", |_| None)
        .expect("computes");
    assert_eq!(
        paths["lib"].to_string(),
        "/nix/store/2vixb94v0hy2xc6p7mbnxxcyc095yyia-has-multi-out-lib"
    );
    assert_eq!(
        paths["out"].to_string(),
        "/nix/store/55lwldka5nyxa08wnvlizyqw02ihy8ic-has-multi-out"
    );
    drv.verify_output_paths("has-multi-out", |_| None)
        .expect("paths verify");
    let text = String::from_utf8(drv.to_aterm()).expect("utf-8");
    assert_eq!(parse_round_trip(&text), drv);
}

fn make_output_path(h: &Hash, drv_name: &str, output: &str) -> StorePath {
    crate::store_path::make_store_path(
        &format!("output:{output}"),
        h,
        &output_path_name(drv_name, output),
    )
    .expect("valid")
}

#[test]
fn real_session_host_1() {
    // docs/serve-protocol.md §13.7: the BasicDerivation of traces/host-1.
    let tinydir = "/nix/store/lw1m8kblcg4wb1mmli5nyvlvsn71hf9y-tinydir";
    let out = "/nix/store/wpwkwrk5jm6181g39iml0ljcqflwccwa-trace-host-0";
    let builder = format!("{tinydir}/bin/tiny");
    let basic = BasicDerivation {
        outputs: BTreeMap::from([("out".into(), DerivationOutput::InputAddressed(sp(out)))]),
        input_srcs: [sp(tinydir)].into(),
        platform: b"x86_64-linux".to_vec(),
        builder: builder.clone().into_bytes(),
        args: vec![b"built 0".to_vec()],
        env: [
            ("builder", builder.as_str()),
            ("name", "trace-host-0"),
            ("out", out),
            ("system", "x86_64-linux"),
        ]
        .into_iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect(),
    };
    let masked = format!(
        r#"Derive([("out","","","")],[],["{tinydir}"],"x86_64-linux","{builder}",["built 0"],[("builder","{builder}"),("name","trace-host-0"),("out",""),("system","x86_64-linux")])"#
    );
    let h = basic.hash_modulo();
    assert_eq!(h, Hash::compute(HashAlgo::Sha256, masked.as_bytes()));
    assert_eq!(
        h.to_base16(),
        "616de7ebce535373736cd46af3b792b6861ebd03f8b6e15245f59b35934ea58a"
    );
    let drv = Derivation {
        input_drvs: BTreeMap::new(),
        basic,
    };
    drv.verify_output_paths("trace-host-0", |_| None)
        .expect("paths verify");
    assert_eq!(
        drv.drv_path("trace-host-0").expect("valid").to_string(),
        "/nix/store/ba6c9wqqn8by96q1qk7f43dvmk60krl5-trace-host-0.drv"
    );
}

#[test]
fn fixed_output_verification() {
    let bar = parse_round_trip(&bar_aterm());
    let mut wrong = bar.basic.clone();
    let Some(DerivationOutput::Fixed { path, .. }) = wrong.outputs.get_mut("out") else {
        panic!("bar has a fixed output");
    };
    *path = sp(FOO_OUT);
    assert!(matches!(
        wrong.verify_fixed_output("bar"),
        Err(DerivationError::OutputPathMismatch { ref output, .. }) if output == "out"
    ));
    // the name matters: the same content address under another name is another path
    assert!(bar.basic.verify_fixed_output("baz").is_err());
    let mut two = bar.basic.clone();
    two.outputs.insert("dev".into(), DerivationOutput::Deferred);
    assert_eq!(
        two.verify_fixed_output("bar"),
        Err(DerivationError::FixedOutputNotAlone("out".into()))
    );
}

#[test]
fn placeholders_and_names() {
    assert_eq!(
        output_path_name("has-multi-out", "lib"),
        "has-multi-out-lib"
    );
    assert_eq!(output_path_name("foo", "out"), "foo");
    let out = hash_placeholder("out");
    assert_eq!(out.len(), 53);
    assert!(out.starts_with('/'));
    assert_eq!(
        out[1..],
        Hash::compute(HashAlgo::Sha256, b"nix-output:out").to_nix32()
    );
    assert_ne!(hash_placeholder("out"), hash_placeholder("dev"));
}

#[test]
fn fallback_paths_are_nix_2_34s() {
    // Nix 2.34 built this floating content-addressed derivation with `echo $out` as the
    // builder: the temporary path it showed.
    let drv =
        StorePath::from_absolute_path(b"/nix/store/f11cx55hrcsb9rg8xav0prg8f0yq5l0x-ca-probe.drv")
            .expect("a store path");
    assert_eq!(
        fallback_output_path(&drv, "out")
            .expect("a path")
            .to_absolute(),
        "/nix/store/7029d2jjw4v555i71206fcg25qni2fnw-ca-probe"
    );
    assert!(fallback_output_path(&drv, "dev")
        .expect("a path")
        .to_absolute()
        .ends_with("-ca-probe-dev"));
}

#[test]
fn escapes() {
    let mut drv = Derivation::default();
    drv.basic.builder = b"a\"b\\c\nd\re\tf\x01\xff".to_vec();
    drv.basic.args = vec![b"\\n".to_vec()];
    drv.basic.env.insert(b"k\"".to_vec(), b"v\n".to_vec());
    let text = drv.to_aterm();
    assert_eq!(
        text,
        b"Derive([],[],[],\"\",\"a\\\"b\\\\c\\nd\\re\\tf\x01\xff\",[\"\\\\n\"],[(\"k\\\"\",\"v\\n\")])"
    );
    assert_eq!(Derivation::from_aterm(&text), Ok(drv));
}

#[test]
fn rejects_non_canonical() {
    let p = "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo";
    let q = "/nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz";
    let cases: &[(String, AtermError)] = &[
        (
            format!(r#"Derive([],[],["{p}","{q}"],"","",[],[])"#),
            AtermError::NotCanonicalOrder {
                what: "input source",
                pos: 64,
            },
        ),
        (
            r#"Derive([],[],[],"","",[],[("a",""),("a","")])"#.into(),
            AtermError::NotCanonicalOrder {
                what: "environment variable",
                pos: 35,
            },
        ),
        (
            r#"Derive([],[],[],"","\a",[],[])"#.into(),
            AtermError::NonCanonicalEscape {
                field: "builder",
                pos: 20,
            },
        ),
        (
            "Derive([],[],[],\"\",\"\t\",[],[])".into(),
            AtermError::NonCanonicalEscape {
                field: "builder",
                pos: 20,
            },
        ),
        (
            r#"Derive([],[],[],"x\"","",[],[])"#.into(),
            AtermError::EscapeInRawField {
                field: "platform",
                pos: 18,
            },
        ),
        (
            r#"Derive([],[],[],"","",[],[]) "#.into(),
            AtermError::TrailingData { pos: 28 },
        ),
        (
            r#"Derive([],[],[],"","",[],[]"#.into(),
            AtermError::UnexpectedEof {
                expected: "')'",
                pos: 27,
            },
        ),
        (
            r#"Derive([],[],[] ,"","",[],[])"#.into(),
            AtermError::UnexpectedChar {
                expected: "','",
                found: ' ',
                pos: 15,
            },
        ),
        (
            r#"Derive([],[],["/tmp/x"],"","",[],[])"#.into(),
            AtermError::StorePath {
                field: "input source",
                pos: 14,
                source: crate::store_path::StorePathError::NotInStore("/tmp/x".into()),
            },
        ),
        (
            r#"DrvWithVersion("xp-dyn-drv",[])"#.into(),
            AtermError::UnexpectedChar {
                expected: "\"Derive(\"",
                found: 'r',
                pos: 1,
            },
        ),
    ];
    for (text, err) in cases {
        assert_eq!(
            Derivation::from_aterm(text.as_bytes()).as_ref(),
            Err(err),
            "{text}"
        );
    }
    let unsorted_outputs = r#"Derive([("out","","",""),("lib","","","")],[],[],"","",[],[])"#;
    assert!(matches!(
        Derivation::from_aterm(unsorted_outputs.as_bytes()),
        Err(AtermError::NotCanonicalOrder { what: "output", .. })
    ));
    let bad_output = r#"Derive([("out","","","x")],[],[],"","",[],[])"#;
    assert!(matches!(
        Derivation::from_aterm(bad_output.as_bytes()),
        Err(AtermError::Output { pos: 8, .. })
    ));
}

proptest! {
    #[test]
    fn aterm_round_trip(drv in derivation()) {
        let text = drv.to_aterm();
        let parsed = Derivation::from_aterm(&text);
        prop_assert_eq!(parsed.as_ref(), Ok(&drv));
    }

    #[test]
    fn aterm_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(drv) = Derivation::from_aterm(&bytes) {
            prop_assert_eq!(drv.to_aterm(), bytes);
        }
    }

    #[test]
    fn aterm_mutations_never_panic(drv in derivation(), at in any::<prop::sample::Index>(), b in any::<u8>(), cut in any::<bool>()) {
        let mut text = drv.to_aterm();
        let i = at.index(text.len());
        if cut {
            text.truncate(i);
        } else {
            text[i] = b;
        }
        if let Ok(parsed) = Derivation::from_aterm(&text) {
            prop_assert_eq!(parsed.to_aterm(), text);
        }
    }

    #[test]
    fn basic_aterm_is_the_drv_aterm_without_input_derivations(basic in basic_derivation()) {
        let full = Derivation { input_drvs: BTreeMap::new(), basic: basic.clone() };
        prop_assert_eq!(basic.to_aterm(), full.to_aterm());
        let parsed = Derivation::from_aterm(&basic.to_aterm()).map(|d| d.basic);
        prop_assert_eq!(parsed.as_ref(), Ok(&basic));
    }

    #[test]
    fn masked_hash_ignores_output_paths(mut basic in basic_derivation(), d in any::<[u8; 20]>()) {
        // hashDerivationModulo must not depend on the input-addressed output paths it computes
        let mut other = basic.clone();
        let mut changed = false;
        for (name, out) in other.outputs.iter_mut() {
            if let DerivationOutput::InputAddressed(p) = out {
                basic.env.insert(name.clone().into_bytes(), p.to_absolute().into_bytes());
                *p = StorePath::from_digest(d, p.name()).expect("valid");
                other.env.insert(name.clone().into_bytes(), p.to_absolute().into_bytes());
                changed = true;
            }
        }
        prop_assume!(changed && basic.fixed_output().is_none());
        prop_assert_eq!(basic.hash_modulo(), other.hash_modulo());
    }
}

const MULTI_DRV: &str = "/nix/store/f501hk8mnfz1vw0v4lm8zdj0dh6zmnhq-multi.drv";
const USER_DRV: &str = "/nix/store/9ryssm2mnlp3mpl27zh0c7cjcwwgqy77-user.drv";

#[test]
fn input_derivation_hash_is_unmasked() {
    // Written by nix-instantiate 2.8 (see testdata/). A dependent replaces an input .drv by
    // the hash of the input's *unmasked* ATerm (Nix's pathDerivationModulo); the masked hash
    // gives other output paths.
    let multi = parse_round_trip(include_str!(
        "testdata/f501hk8mnfz1vw0v4lm8zdj0dh6zmnhq-multi.drv"
    ));
    let user = parse_round_trip(include_str!(
        "testdata/9ryssm2mnlp3mpl27zh0c7cjcwwgqy77-user.drv"
    ));
    assert_eq!(multi.drv_path("multi").expect("valid"), sp(MULTI_DRV));
    assert_eq!(user.drv_path("user").expect("valid"), sp(USER_DRV));
    multi
        .verify_output_paths("multi", |_| None)
        .expect("multi verifies");

    let unmasked = multi.hash_modulo(false, |_| None).expect("no inputs");
    let masked = multi.hash_modulo(true, |_| None).expect("no inputs");
    assert_ne!(unmasked, masked);
    let with = |h: Hash| move |p: &StorePath| (p == &sp(MULTI_DRV)).then_some(h);
    user.verify_output_paths("user", with(unmasked))
        .expect("user verifies with the unmasked input hash");
    assert!(matches!(
        user.verify_output_paths("user", with(masked)),
        Err(DerivationError::OutputPathMismatch { ref output, .. }) if output == "out"
    ));
    assert_eq!(
        user.compute_output_paths("user", with(unmasked))
            .expect("computes")["out"],
        sp("/nix/store/a03v29k793nirapx9df48v4f1rzizms0-user")
    );
}
