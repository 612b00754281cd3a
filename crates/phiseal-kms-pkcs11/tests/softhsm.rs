//! `Pkcs11Kms` against a real SoftHSM2 token, through the real PKCS#11 module.
//!
//! SoftHSM2 reads its configuration (where the tokens live) from the `SOFTHSM2_CONF`
//! environment variable once, when the module is initialized. Environment variables are
//! process-wide and setting them is `unsafe` in Rust 2024 (this crate forbids `unsafe`), so
//! every test runs its body in a child process: the test (the parent) creates a temporary
//! directory with a private `softhsm2.conf` and token directory, initializes the test's
//! tokens with `softhsm2-util`, and runs this test binary again for just this test with
//! `SOFTHSM2_CONF` set and [`CHILD_MARKER`] naming the directory. The child runs the body; the
//! parent reports the child's output if it fails, and removes the directory. This isolates
//! the tests under `cargo test` (threads) and `cargo nextest` (processes) alike.
//!
//! The module is `PHISEAL_PKCS11_MODULE` (default `/usr/lib/softhsm/libsofthsm2.so`), the
//! token tool `PHISEAL_SOFTHSM2_UTIL` (default `softhsm2-util` on `PATH`). If either is
//! missing the tests fail: they never skip.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::Attribute;
use cryptoki::session::UserType;
use phiseal::context::TenantId;
use phiseal::kms::{KeyBinding, Kms, WrappedKey};
use phiseal::testkit::conformance;
use phiseal::{BackendErrorKind, TenantKey};
use phiseal_kms_pkcs11::{Pkcs11Config, Pkcs11Kms, RECONNECT_BACKOFF, generate_root_key};
use secrecy::SecretString;

const INSTALL_HINT: &str = "the PKCS#11 tests need SoftHSM2: install the Debian package \
    softhsm2 (`apt-get install softhsm2`, as root; scripts/test does it), or set \
    PHISEAL_PKCS11_MODULE to libsofthsm2.so and PHISEAL_SOFTHSM2_UTIL to softhsm2-util";
/// Set in the child process to the test's directory.
const CHILD_MARKER: &str = "PHISEAL_SOFTHSM_TEST_DIR";
const PIN: &str = "user-pin-4711";
const SO_PIN: &str = "so-pin-0815";

fn module() -> PathBuf {
    let module = std::env::var_os("PHISEAL_PKCS11_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"));
    assert!(
        module.is_file(),
        "PKCS#11 module {} not found: {INSTALL_HINT}",
        module.display()
    );
    module
}

/// Runs `body` in a child process with a private SoftHSM2 configuration holding freshly
/// initialized tokens labelled `tokens` (user PIN [`PIN`]). `name` must be the test's name.
fn softhsm_test<F, Fut>(name: &str, tokens: &[&str], body: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    if std::env::var_os(CHILD_MARKER).is_some() {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(body());
        return;
    }
    let module = module();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("softhsm2.conf");
    let token_dir = dir.path().join("tokens");
    std::fs::create_dir(&token_dir).unwrap();
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n\
             slots.removable = false\n",
            token_dir.display()
        ),
    )
    .unwrap();
    let util = std::env::var_os("PHISEAL_SOFTHSM2_UTIL").unwrap_or_else(|| "softhsm2-util".into());
    for token in tokens {
        let out = Command::new(&util)
            .args(["--init-token", "--free", "--label", token])
            .args(["--pin", PIN, "--so-pin", SO_PIN])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {util:?}: {e}; {INSTALL_HINT}"));
        assert!(
            out.status.success(),
            "softhsm2-util --init-token {token} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(CHILD_MARKER, dir.path())
        .env("PHISEAL_PKCS11_MODULE", &module)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "test {name} failed in its SoftHSM2 child process ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The child must have run exactly this test (a renamed test would otherwise pass vacuously).
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the child process did not run test {name}:\n{stdout}"
    );
}

fn config(token: &str, key: &str, previous: &[&str]) -> Pkcs11Config {
    Pkcs11Config {
        module: module(),
        token_label: token.to_owned(),
        pin: SecretString::from(PIN.to_owned()),
        key_label: key.to_owned(),
        previous_key_labels: previous.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn binding(tenant: &str, version: u32) -> KeyBinding {
    KeyBinding {
        tenant: TenantId::new(tenant).unwrap(),
        version,
    }
}

async fn connect(config: &Pkcs11Config) -> Pkcs11Kms {
    Pkcs11Kms::connect(config)
        .await
        .unwrap_or_else(|e| panic!("connect {config:?}: {e}"))
}

#[test]
fn conformance_suite() {
    softhsm_test("conformance_suite", &["conformance"], || async {
        let config = config("conformance", "root-1", &[]);
        generate_root_key(&config, "root-1").await.unwrap();
        let kms = connect(&config).await;
        assert_eq!(kms.name(), "pkcs11");
        assert_eq!(kms.root_key_ref(), "pkcs11:conformance/root-1");
        conformance::kms(Arc::new(kms), true).await;
    });
}

#[test]
fn wrapped_format_and_strict_parsing() {
    softhsm_test("wrapped_format_and_strict_parsing", &["format"], || async {
        let config = config("format", "root-1", &[]);
        generate_root_key(&config, "root-1").await.unwrap();
        let kms = connect(&config).await;
        let key = TenantKey::from_bytes([0x11; 32]);
        let b = binding("t", 1);
        let w1 = kms.wrap(&key, &b).await.unwrap();
        let w2 = kms.wrap(&key, &b).await.unwrap();
        assert_eq!(w1.ciphertext.len(), 61);
        assert_eq!(w1.ciphertext[0], 0x01);
        assert_ne!(
            w1.ciphertext[1..13],
            w2.ciphertext[1..13],
            "IVs must differ"
        );
        assert_eq!(w1.root_key_ref, "pkcs11:format/root-1");
        for (what, bytes) in [
            ("truncated", w1.ciphertext[..60].to_vec()),
            ("extended", [w1.ciphertext.as_slice(), &[0]].concat()),
            ("format byte", [&[0x02], &w1.ciphertext[1..]].concat()),
            ("IV", {
                let mut c = w1.ciphertext.clone();
                c[1] ^= 1;
                c
            }),
            ("ciphertext", {
                let mut c = w1.ciphertext.clone();
                c[20] ^= 1;
                c
            }),
        ] {
            let altered = WrappedKey {
                root_key_ref: w1.root_key_ref.clone(),
                ciphertext: bytes,
            };
            let err = kms.unwrap(&altered, &b).await.unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::InvalidData, "{what}: {err}");
        }
        // A GCM tag failure is reported as InvalidData, naming key, token and return code.
        let mut tag = w1.clone();
        tag.ciphertext[60] ^= 1;
        let err = kms.unwrap(&tag, &b).await.unwrap_err();
        let text = err.to_string();
        // SoftHSM2 says CKR_GENERAL_ERROR; from this token (only) that is a tag mismatch.
        assert_eq!(err.kind(), BackendErrorKind::InvalidData, "{text}");
        assert!(text.contains("CKR_GENERAL_ERROR"), "{text}");
        assert!(text.starts_with("pkcs11: unwrap (C_Decrypt)"), "{text}");
        assert!(
            text.contains("'root-1'") && text.contains("'format'"),
            "{text}"
        );
        // The backend keeps working after failures (failed sessions are discarded).
        let back = kms.unwrap(&w1, &b).await.unwrap();
        assert_eq!(back.expose(), &[0x11; 32]);
    });
}

#[test]
fn wrong_pin_is_denied() {
    softhsm_test("wrong_pin_is_denied", &["pin"], || async {
        let good = config("pin", "root-1", &[]);
        generate_root_key(&good, "root-1").await.unwrap();
        let bad = Pkcs11Config {
            pin: SecretString::from("not-the-pin".to_owned()),
            ..good.clone()
        };
        let err = Pkcs11Kms::connect(&bad).await.unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Denied, "{err}");
        let text = err.to_string();
        assert!(text.contains("CKR_PIN_INCORRECT"), "{text}");
        assert!(!text.contains("not-the-pin"), "{text}");
    });
}

#[test]
fn unknown_module_token_or_key_is_misconfigured() {
    softhsm_test(
        "unknown_module_token_or_key_is_misconfigured",
        &["labels", "twin", "twin"],
        || async {
            let good = config("labels", "root-1", &[]);
            generate_root_key(&good, "root-1").await.unwrap();
            connect(&good).await;
            for (c, expected) in [
                (
                    Pkcs11Config {
                        module: "/nonexistent/libpkcs11.so".into(),
                        ..good.clone()
                    },
                    "pkcs11: cannot load the PKCS#11 module '/nonexistent/libpkcs11.so'",
                ),
                (
                    config("no-such-token", "root-1", &[]),
                    "pkcs11: no token labelled 'no-such-token'",
                ),
                (
                    config("twin", "root-1", &[]),
                    "pkcs11: 2 tokens are labelled 'twin'",
                ),
                (
                    config("labels", "no-such-key", &[]),
                    "pkcs11: no secret key labelled 'no-such-key' on token 'labels'",
                ),
                (
                    config("labels", "root-1", &["no-such-key"]),
                    "pkcs11: no secret key labelled 'no-such-key' on token 'labels'",
                ),
            ] {
                let err = Pkcs11Kms::connect(&c).await.unwrap_err();
                assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
                assert!(err.to_string().starts_with(expected), "{err}");
            }
            let err = generate_root_key(&good, "root-1").await.unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::Conflict, "{err}");
        },
    );
}

#[test]
fn weak_keys_are_refused() {
    softhsm_test("weak_keys_are_refused", &["weak"], || async {
        // Keys made with the raw API, each violating one requirement.
        let ctx = Pkcs11::new(module()).unwrap();
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .unwrap();
        let slot = ctx
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label() == "weak")
            .unwrap();
        let session = ctx.open_rw_session(slot).unwrap();
        session
            .login(UserType::User, Some(&SecretString::from(PIN.to_owned())))
            .unwrap();
        let base = |label: &str| {
            vec![
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Token(true),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
            ]
        };
        let variants: [(&str, Vec<Attribute>); 6] = [
            (
                "derivable",
                vec![
                    Attribute::ValueLen(32u64.into()),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Private(true),
                    Attribute::Derive(true),
                ],
            ),
            (
                "extractable",
                vec![
                    Attribute::ValueLen(32u64.into()),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(true),
                    Attribute::Private(true),
                ],
            ),
            (
                "not-sensitive",
                vec![
                    Attribute::ValueLen(32u64.into()),
                    Attribute::Sensitive(false),
                    Attribute::Extractable(false),
                    Attribute::Private(true),
                ],
            ),
            (
                "aes-128",
                vec![
                    Attribute::ValueLen(16u64.into()),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Private(true),
                ],
            ),
            (
                "public",
                vec![
                    Attribute::ValueLen(32u64.into()),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Private(false),
                ],
            ),
            (
                "ok",
                vec![
                    Attribute::ValueLen(32u64.into()),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Private(true),
                ],
            ),
        ];
        for (label, extra) in &variants {
            let template = [base(label), extra.clone()].concat();
            session
                .generate_key(&Mechanism::AesKeyGen, &template)
                .unwrap();
        }
        for (label, why) in [
            ("extractable", "CKA_EXTRACTABLE"),
            ("not-sensitive", "CKA_SENSITIVE"),
            ("aes-128", "CKA_VALUE_LEN"),
            ("public", "CKA_PRIVATE"),
            ("derivable", "CKA_DERIVE"),
        ] {
            let err = Pkcs11Kms::connect(&config("weak", label, &[]))
                .await
                .unwrap_err();
            assert_eq!(
                err.kind(),
                BackendErrorKind::Misconfigured,
                "{label}: {err}"
            );
            assert!(err.to_string().contains(why), "{label}: {err}");
        }
        connect(&config("weak", "ok", &[])).await;
    });
}

#[test]
fn rotation_keeps_previous_keys_unwrappable() {
    softhsm_test(
        "rotation_keeps_previous_keys_unwrappable",
        &["rotation"],
        || async {
            let v1 = config("rotation", "root-1", &[]);
            generate_root_key(&v1, "root-1").await.unwrap();
            let key = TenantKey::from_bytes([0x42; 32]);
            let b = binding("tenant-a", 1);
            let old = connect(&v1).await.wrap(&key, &b).await.unwrap();
            assert_eq!(old.root_key_ref, "pkcs11:rotation/root-1");

            generate_root_key(&v1, "root-2").await.unwrap();
            let v2 = connect(&config("rotation", "root-2", &["root-1"])).await;
            assert_eq!(
                v2.current_root_key_ref().await.unwrap(),
                "pkcs11:rotation/root-2"
            );
            assert_eq!(v2.unwrap(&old, &b).await.unwrap().expose(), &[0x42; 32]);
            let new = v2.wrap(&key, &b).await.unwrap();
            assert_eq!(new.root_key_ref, "pkcs11:rotation/root-2");
            assert_eq!(v2.unwrap(&new, &b).await.unwrap().expose(), &[0x42; 32]);

            // Once root-1 is no longer configured, its wraps are refused without calling the token.
            let v2_only = connect(&config("rotation", "root-2", &[])).await;
            let err = v2_only.unwrap(&old, &b).await.unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::InvalidData, "{err}");
            assert!(err.to_string().contains("previous_key_labels"), "{err}");
            for foreign_ref in [
                "pkcs11:other-token/root-1",
                "pkcs11:rotation/root-3",
                "pkcs11:rotation/",
                "local:root-1",
            ] {
                let w = WrappedKey {
                    root_key_ref: foreign_ref.to_owned(),
                    ciphertext: new.ciphertext.clone(),
                };
                let err = v2.unwrap(&w, &b).await.unwrap_err();
                assert_eq!(
                    err.kind(),
                    BackendErrorKind::InvalidData,
                    "{foreign_ref}: {err}"
                );
            }
        },
    );
}

#[test]
fn another_keys_wrap_does_not_unwrap() {
    softhsm_test("another_keys_wrap_does_not_unwrap", &["cross"], || async {
        let c = config("cross", "key-a", &["key-b"]);
        generate_root_key(&c, "key-a").await.unwrap();
        generate_root_key(&c, "key-b").await.unwrap();
        let kms = connect(&c).await;
        let b = binding("tenant-x", 2);
        let wrapped = kms.wrap(&TenantKey::from_bytes([7; 32]), &b).await.unwrap();
        // Same bytes, relabelled as made by key-b (a configured key): the token refuses them.
        let relabelled = WrappedKey {
            root_key_ref: "pkcs11:cross/key-b".to_owned(),
            ciphertext: wrapped.ciphertext.clone(),
        };
        let err = kms.unwrap(&relabelled, &b).await.unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("'key-b'"), "{err}");
    });
}

#[test]
fn debug_shows_no_pin() {
    softhsm_test("debug_shows_no_pin", &["debug"], || async {
        let c = config("debug", "root-1", &[]);
        generate_root_key(&c, "root-1").await.unwrap();
        let kms = connect(&c).await;
        for shown in [format!("{c:?}"), format!("{kms:?}")] {
            assert!(!shown.contains(PIN), "{shown}");
            assert!(shown.contains("root-1"), "{shown}");
        }
        assert!(format!("{c:?}").contains("[REDACTED]"));
    });
}

/// A session of this process on `token`, logged in (or already logged in as the backend).
fn own_session(ctx: &Pkcs11, token: &str) -> cryptoki::session::Session {
    let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == token)
        .unwrap();
    let session = ctx.open_rw_session(slot).unwrap();
    let _ = session.login(UserType::User, Some(&SecretString::from(PIN.to_owned())));
    session
}

fn destroy_key(session: &cryptoki::session::Session, label: &str) {
    let found = session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap();
    assert_eq!(found.len(), 1, "{label}");
    session.destroy_object(found[0]).unwrap();
}

/// Runs the SoftHSM2 token tool (in the child process, whose `SOFTHSM2_CONF` it inherits).
fn token_tool(args: &[&str]) {
    let util = std::env::var_os("PHISEAL_SOFTHSM2_UTIL").unwrap_or_else(|| "softhsm2-util".into());
    let out = Command::new(&util).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "softhsm2-util {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_reconnection_logs_in_only_to_the_token_it_connected_to() {
    softhsm_test(
        "a_reconnection_logs_in_only_to_the_token_it_connected_to",
        &["swap"],
        || async {
            let cfg = config("swap", "root", &[]);
            generate_root_key(&cfg, "root").await.unwrap();
            let kms = connect(&cfg).await;
            let key = TenantKey::from_bytes([0x31; 32]);
            let b = binding("tenant-a", 1);
            let wrapped = kms.wrap(&key, &b).await.unwrap();
            // The connection is lost, and meanwhile another token took the label (with a key
            // of the same label): no PIN for it, a refusal.
            tokio::time::sleep(RECONNECT_BACKOFF).await;
            Pkcs11::new(module()).unwrap().finalize().unwrap();
            token_tool(&["--delete-token", "--token", "swap"]);
            token_tool(&[
                "--init-token",
                "--free",
                "--label",
                "swap",
                "--pin",
                PIN,
                "--so-pin",
                SO_PIN,
            ]);
            generate_root_key(&cfg, "root").await.unwrap();
            let err = kms.unwrap(&wrapped, &b).await.unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::Denied, "{err}");
            assert!(
                err.to_string().contains("another token took its label"),
                "{err}"
            );
            let err = kms.wrap(&key, &b).await.unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::Denied, "{err}");
        },
    );
}

#[test]
fn a_module_initialized_again_by_one_backend_retires_the_handles_of_the_others() {
    softhsm_test(
        "a_module_initialized_again_by_one_backend_retires_the_handles_of_the_others",
        &["beta", "alpha"],
        || async {
            // Two backends on one module (a migration between two tokens of one HSM): the
            // second one's handle numbers are the higher ones.
            let beta_cfg = config("beta", "root-b", &[]);
            let alpha_cfg = config("alpha", "root-a", &[]);
            generate_root_key(&beta_cfg, "root-b").await.unwrap();
            generate_root_key(&alpha_cfg, "root-a").await.unwrap();
            let beta = connect(&beta_cfg).await;
            let alpha = connect(&alpha_cfg).await;
            let key = TenantKey::from_bytes([0x5b; 32]);
            let b = binding("tenant-a", 1);
            beta.wrap(&key, &b).await.unwrap();
            alpha.wrap(&key, &b).await.unwrap();

            // The module is reset; alpha notices first and initializes it again, so the
            // numbers it is handed from then on start again at the bottom, where beta's
            // handles are.
            tokio::time::sleep(RECONNECT_BACKOFF).await;
            Pkcs11::new(module()).unwrap().finalize().unwrap();
            for _ in 0..3 {
                let w = alpha.wrap(&key, &b).await.unwrap();
                assert_eq!(alpha.unwrap(&w, &b).await.unwrap().expose(), &[0x5b; 32]);
            }
            // beta must not wrap through whatever its old numbers name now: what it wraps is
            // under beta's own root key, as a fresh connection to beta confirms.
            let wrapped = beta.wrap(&key, &b).await.unwrap();
            let fresh = connect(&beta_cfg).await;
            assert_eq!(
                fresh.unwrap(&wrapped, &b).await.unwrap().expose(),
                &[0x5b; 32]
            );
            assert_eq!(
                beta.unwrap(&wrapped, &b).await.unwrap().expose(),
                &[0x5b; 32]
            );
        },
    );
}

#[test]
fn a_lost_login_is_restored_and_a_destroyed_key_is_a_refusal() {
    softhsm_test(
        "a_lost_login_is_restored_and_a_destroyed_key_is_a_refusal",
        &["relogin"],
        || async {
            let old_cfg = config("relogin", "root-0", &[]);
            generate_root_key(&old_cfg, "root-0").await.unwrap();
            generate_root_key(&old_cfg, "root-1").await.unwrap();
            let key = TenantKey::from_bytes([0x24; 32]);
            let b = binding("tenant-a", 1);
            let under_old = connect(&old_cfg).await.wrap(&key, &b).await.unwrap();
            let kms = connect(&config("relogin", "root-1", &["root-0"])).await;
            let wrapped = kms.wrap(&key, &b).await.unwrap();
            let ctx = Pkcs11::new(module()).unwrap();

            // Another session of this process logs the application out (as a token removed
            // and re-inserted does): the backend logs in again by itself, and keeps working
            // once that other session is closed too.
            let session = own_session(&ctx, "relogin");
            session.logout().unwrap();
            assert_eq!(
                kms.unwrap(&wrapped, &b).await.unwrap().expose(),
                &[0x24; 32]
            );
            drop(session);
            let again = kms.wrap(&key, &b).await.unwrap();
            assert_eq!(kms.unwrap(&again, &b).await.unwrap().expose(), &[0x24; 32]);
            assert_eq!(
                kms.unwrap(&under_old, &b).await.unwrap().expose(),
                &[0x24; 32]
            );

            // The module finalized underneath (session handle numbers start again at 1 once it
            // is initialized again): reconnected, and the old connection's sessions are not
            // closed by number under the new one. (At most one reconnection starts per
            // RECONNECT_BACKOFF: wait it out first.)
            tokio::time::sleep(RECONNECT_BACKOFF).await;
            Pkcs11::new(module()).unwrap().finalize().unwrap();
            assert_eq!(
                kms.unwrap(&wrapped, &b).await.unwrap().expose(),
                &[0x24; 32]
            );
            for _ in 0..3 {
                let w = kms.wrap(&key, &b).await.unwrap();
                assert_eq!(kms.unwrap(&w, &b).await.unwrap().expose(), &[0x24; 32]);
            }

            // A previous key destroyed: after the next lost login its wraps are refused, the
            // current key's work on.
            tokio::time::sleep(RECONNECT_BACKOFF).await;
            let session = own_session(&ctx, "relogin");
            destroy_key(&session, "root-0");
            session.logout().unwrap();
            assert_eq!(
                kms.unwrap(&wrapped, &b).await.unwrap().expose(),
                &[0x24; 32]
            );
            let err = kms.unwrap(&under_old, &b).await.unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::Denied, "{err}");

            // The current key destroyed: a refusal, not an outage (no stale keys).
            tokio::time::sleep(RECONNECT_BACKOFF).await;
            let session = own_session(&ctx, "relogin");
            destroy_key(&session, "root-1");
            let err = kms.unwrap(&wrapped, &b).await.unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::Denied, "{err}");
            assert!(
                err.to_string().contains("no longer on token 'relogin'"),
                "{err}"
            );
            // (Within the back-off, the same answer without another reconnection.)
            let err = kms.wrap(&key, &b).await.unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::Denied, "{err}");
        },
    );
}
