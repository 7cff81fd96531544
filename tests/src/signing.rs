//! Signed configuration in the mini-cluster: signer keys (`mesh-agent config keygen`), signer
//! sets at the authority and pinned on nodes (`config signers`), and bundles built and signed
//! with the real CLI (`config bundle`, `config sign`) and renamed into the file the authority
//! follows (`authority serve --bundle`).

use std::path::{Path, PathBuf};

use crate::{
    authority::run_cli,
    cluster::Cluster,
    registry::{render_with_services, NodeEntry, ServiceEntry, WorkloadEntry},
};

/// What [`Cluster::build_bundle_file_with`] builds a bundle from, beside the cluster's nodes.
#[derive(Clone, Copy, Debug, Default)]
pub struct BundleSpec<'a> {
    /// Nodes listed beside the cluster's (e.g. one that never runs, for phantom workloads).
    pub extra_nodes: &'a [NodeEntry],
    pub workloads: &'a [WorkloadEntry],
    pub services: &'a [ServiceEntry],
    /// Policy files: (name, text).
    pub policies: &'a [(&'a str, &'a str)],
    /// More `config bundle` arguments (e.g. a rollout: `--canary-nodes n1
    /// --canary-window-secs 10`, `--activate-at T`).
    pub args: &'a [&'a str],
}

/// A signer key made by `config keygen`.
#[derive(Clone, Debug)]
pub struct SignerKey {
    pub key: PathBuf,
    pub key_id: String,
}

/// The file the authority follows when it serves signed configuration.
pub const BUNDLE_FILE: &str = "bundle.json";

impl Cluster {
    /// A new signer key `<tmp>/signer-<name>.key`.
    #[track_caller]
    pub fn signer_key(&self, name: &str) -> SignerKey {
        let key = self.tmp_dir().join(format!("signer-{name}.key"));
        let out = run_cli(&[
            "config",
            "keygen",
            "--out",
            &key.to_string_lossy(),
            "--output",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("config keygen output {out:?}: {e}"));
        let key_id = v["keyId"]
            .as_str()
            .or_else(|| v["key_id"].as_str())
            .unwrap_or_else(|| panic!("no key id in {v}"))
            .to_owned();
        SignerKey { key, key_id }
    }

    /// Adds `key` to the signer set `file` and activates it.
    #[track_caller]
    pub fn trust_signer(&self, file: &Path, key: &SignerKey) {
        let pubfile = PathBuf::from(format!("{}.pub", key.key.display()));
        let f = file.to_string_lossy();
        run_cli(&[
            "config",
            "signers",
            "add",
            &pubfile.to_string_lossy(),
            "--file",
            &f,
        ]);
        run_cli(&["config", "signers", "activate", &key.key_id, "--file", &f]);
    }

    /// The authority's signer set (`<ca>/signers.json`).
    pub fn authority_signers(&self) -> PathBuf {
        self.authority().dir().join("signers.json")
    }

    /// Node `index`'s pinned signer set (`<identity dir>/signers.json`).
    pub fn node_signers(&self, index: usize) -> PathBuf {
        self.agent_spec(index).identity_dir.join("signers.json")
    }

    /// [`Cluster::build_bundle_file`], then renamed into `<tmp>/bundle.json` (the authority
    /// publishes it). Returns the signed bundle's own path (kept, for replays).
    #[track_caller]
    pub fn publish_bundle_file(
        &self,
        key: &SignerKey,
        version: u64,
        workloads: &[WorkloadEntry],
        services: &[ServiceEntry],
        policies: &[(&str, &str)],
    ) -> PathBuf {
        let signed = self.build_bundle_file(key, version, workloads, services, policies);
        self.install_bundle(&signed);
        signed
    }

    /// Builds configuration `version` (the cluster's nodes, `workloads`, `services` and the
    /// policy files `policies`) with `config bundle` and signs it with `key`, as
    /// `<tmp>/bundle-v<version>.json`; nothing is published.
    #[track_caller]
    pub fn build_bundle_file(
        &self,
        key: &SignerKey,
        version: u64,
        workloads: &[WorkloadEntry],
        services: &[ServiceEntry],
        policies: &[(&str, &str)],
    ) -> PathBuf {
        self.build_bundle_file_with(
            key,
            version,
            &BundleSpec {
                workloads,
                services,
                policies,
                ..BundleSpec::default()
            },
        )
    }

    /// [`Cluster::build_bundle_file`] from a [`BundleSpec`]: nodes beside the cluster's, and
    /// more `config bundle` arguments.
    #[track_caller]
    pub fn build_bundle_file_with(
        &self,
        key: &SignerKey,
        version: u64,
        spec: &BundleSpec<'_>,
    ) -> PathBuf {
        let BundleSpec {
            extra_nodes,
            workloads,
            services,
            policies,
            args: bundle_args,
        } = *spec;
        let src = self.tmp_dir().join(format!("config-src-v{version}"));
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(src.join("policies")).expect("source dir");
        let mut nodes = self.registry_nodes();
        nodes.extend_from_slice(extra_nodes);
        let registry = render_with_services(&nodes, workloads, services);
        std::fs::write(src.join("registry.yaml"), &registry.text).expect("registry");
        for (name, text) in policies {
            std::fs::write(src.join("policies").join(name), text).expect("policy");
        }
        let unsigned = self
            .tmp_dir()
            .join(format!("bundle-v{version}.unsigned.json"));
        let signed = self.tmp_dir().join(format!("bundle-v{version}.json"));
        let (src, version, unsigned_s) = (
            src.to_string_lossy().into_owned(),
            version.to_string(),
            unsigned.to_string_lossy().into_owned(),
        );
        let mut args = vec![
            "config",
            "bundle",
            &src,
            "--version",
            &version,
            "--out",
            &unsigned_s,
        ];
        args.extend_from_slice(bundle_args);
        run_cli(&args);
        let _ = std::fs::remove_file(&signed);
        run_cli(&[
            "config",
            "sign",
            &unsigned.to_string_lossy(),
            "--key",
            &key.key.to_string_lossy(),
            "--out",
            &signed.to_string_lossy(),
        ]);
        signed
    }

    /// Restarts the authority on the bundle file (`<tmp>/`[`BUNDLE_FILE`]) with `args`,
    /// forgetting the versions its registry mode published: they are not the signer's.
    #[track_caller]
    pub fn follow_bundle_afresh(&self, args: &[&str]) {
        let mut a = self.authority();
        a.stop();
        let _ = std::fs::remove_file(a.dir().join("state/ids.json"));
        a.follow_bundle(&self.tmp_dir().join(BUNDLE_FILE));
        a.set_extra_args(args);
        a.start();
    }

    /// Renames a copy of `bundle` into the file the authority follows.
    #[track_caller]
    pub fn install_bundle(&self, bundle: &Path) {
        let tmp = self.tmp_dir().join(".bundle.json.tmp");
        std::fs::copy(bundle, &tmp)
            .and_then(|_| std::fs::rename(&tmp, self.tmp_dir().join(BUNDLE_FILE)))
            .unwrap_or_else(|e| panic!("installing {}: {e}", bundle.display()));
    }
}
