//! Building a bundle from a source directory, and checking a bundle's content: the registry
//! parses strictly and the policies load and compile against it — from the bundle's own
//! texts, so that what was checked is exactly what is signed and, later, applied.
//!
//! Source layout: `DIR/registry.yaml` (nodes, workloads, services) and `DIR/policies/*.yaml`
//! / `*.yml` (read as `policy lint` reads a directory: regular files or links to them, no
//! sub-directories; other files are ignored). `policies/` may be absent (no policy).

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{signers::read_bounded, Bundle, PolicyFile, Rejection, MAX_BUNDLE_BYTES};
use crate::{
    policy::{
        compile::{self, CompileError, CompiledPolicy},
        model::PolicyBundle,
        parse::{self, PolicyError, MAX_FILE_BYTES},
        source::CompileContext,
    },
    registry::{Registry, RegistryError},
};

/// The registry file of a source directory.
pub const REGISTRY_FILE: &str = "registry.yaml";
/// The policy directory of a source directory.
pub const POLICIES_DIR: &str = "policies";
/// Room left in [`MAX_BUNDLE_BYTES`] for the signatures of a built bundle.
const SIGNATURE_ROOM: usize = 64 * 1024;

/// What compiling the policies needs besides the bundle (`policy lint`'s flags).
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// The mesh's trust domain (default `cluster.local`).
    pub trust_domain: String,
    /// Istio's root namespace: its policies apply mesh-wide (default `istio-system`).
    pub root_namespace: String,
    /// Istio's `trustDomainAliases`.
    pub trust_domain_aliases: Vec<String>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            trust_domain_aliases: Vec::new(),
        }
    }
}

/// A bundle's content, parsed and compiled.
#[derive(Debug)]
pub struct Content {
    /// The registry, as the authority sees it (no node's cgroups resolved).
    pub registry: Registry,
    pub policies: PolicyBundle,
    /// What `policy apply` would write to the maps.
    pub compiled: CompiledPolicy,
}

/// Why a bundle's content does not check.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Policy(#[from] Box<PolicyError>),
    #[error("compiling the policies: {0}")]
    Compile(#[from] CompileError),
}

/// Why a bundle could not be built (nothing is written).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {size} bytes (a file may have at most {max})", path.display())]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("{}: the file name is not UTF-8", path.display())]
    NonUtf8Name { path: PathBuf },
    #[error(transparent)]
    Bundle(#[from] Rejection),
    #[error(transparent)]
    Content(#[from] ContentError),
}

impl Bundle {
    /// Builds version `version` from the source directory `dir` and checks its content with
    /// the default [`CheckOptions`].
    pub fn build(
        dir: &Path,
        version: u64,
        source_revision: Option<String>,
    ) -> Result<Bundle, BuildError> {
        Self::build_with(dir, version, source_revision, &CheckOptions::default()).map(|(b, _)| b)
    }

    /// Builds version `version` from `dir`, created now: reads `registry.yaml` and
    /// `policies/*.y{a,}ml` once, then checks the bundle's structure and content (errors name
    /// the files in `dir`). Answers the bundle and its checked content.
    pub fn build_with(
        dir: &Path,
        version: u64,
        source_revision: Option<String>,
        options: &CheckOptions,
    ) -> Result<(Bundle, Content), BuildError> {
        let registry_path = dir.join(REGISTRY_FILE);
        let registry = read_text(&registry_path, MAX_BUNDLE_BYTES as u64)?;
        let policies = read_policies(&dir.join(POLICIES_DIR))?;
        let bundle = Bundle::new(version, now_rfc3339(), source_revision, registry, policies)?;
        let content = bundle.check_content_at(dir, options)?;
        let size = bundle.to_json().len();
        if size > MAX_BUNDLE_BYTES - SIGNATURE_ROOM {
            return Err(Rejection::Oversized {
                detail: format!(
                    "the bundle would have {size} bytes (at most {})",
                    MAX_BUNDLE_BYTES - SIGNATURE_ROOM
                ),
            }
            .into());
        }
        Ok((bundle, content))
    }

    /// Parses the registry and compiles the policies of this bundle, from its texts (errors
    /// name `registry.yaml` and `policies/<name>`).
    pub fn check_content(&self, options: &CheckOptions) -> Result<Content, ContentError> {
        self.check_content_at(Path::new(""), options)
    }

    fn check_content_at(
        &self,
        base: &Path,
        options: &CheckOptions,
    ) -> Result<Content, ContentError> {
        let registry = Registry::parse_all(&self.registry, &base.join(REGISTRY_FILE))?;
        let policies = self.parse_policies_at(base).map_err(Box::new)?;
        let ctx = CompileContext {
            registry: Arc::new(registry),
            root_ns: options.root_namespace.clone(),
            trust_domain: options.trust_domain.clone(),
            trust_domain_aliases: options.trust_domain_aliases.clone(),
        };
        let compiled =
            compile::compile_with(&policies, &ctx.registry, &ctx.root_ns, &ctx.trust_domains())?;
        let registry = Arc::try_unwrap(ctx.registry).unwrap_or_else(|r| (*r).clone());
        Ok(Content {
            registry,
            policies,
            compiled,
        })
    }

    /// The policies of this bundle, parsed from its texts as a policy directory is: every
    /// file strictly, names unique across files (`kind namespace/name`), at most
    /// [`MAX_OBJECTS`] objects in all.
    pub fn parse_policies(&self) -> Result<PolicyBundle, PolicyError> {
        self.parse_policies_at(Path::new(""))
    }

    fn parse_policies_at(&self, base: &Path) -> Result<PolicyBundle, PolicyError> {
        // The loader `load_dir` uses, over the bundle's texts: the same checks across files
        // (duplicates, the object budget) and the same errors.
        let names: Vec<String> = self
            .policies
            .iter()
            .map(|p| base.join(POLICIES_DIR).join(&p.name).display().to_string())
            .collect();
        let files: Vec<(&str, &str)> = names
            .iter()
            .zip(&self.policies)
            .map(|(n, p)| (n.as_str(), p.text.as_str()))
            .collect();
        parse::load_texts(&files)
    }

    /// The registry of this bundle, parsed strictly (the authority's view).
    pub fn parse_registry(&self) -> Result<Registry, RegistryError> {
        Registry::parse_all(&self.registry, Path::new(REGISTRY_FILE))
    }

    /// Writes the bundle's sources into `dir` (created 0700 if needed): `registry.yaml` and
    /// `policies/<name>`, each 0600 and atomically; policy files of `policies/` that the
    /// bundle does not have are removed. For tools that read a directory.
    pub fn materialize(&self, dir: &Path) -> Result<(), crate::files::FileError> {
        use crate::files::{create_private_dir, write_atomic, FileError};
        let policies = dir.join(POLICIES_DIR);
        create_private_dir(&policies)?;
        write_atomic(&dir.join(REGISTRY_FILE), self.registry.as_bytes(), 0o600)?;
        for p in &self.policies {
            write_atomic(&policies.join(&p.name), p.text.as_bytes(), 0o600)?;
        }
        let entries = fs::read_dir(&policies).map_err(|source| FileError {
            op: "listing",
            path: policies.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let keep = name
                .to_str()
                .is_some_and(|n| self.policies.iter().any(|p| p.name == n));
            if !keep && is_yaml(&entry.path()) {
                fs::remove_file(entry.path()).map_err(|source| FileError {
                    op: "removing",
                    path: entry.path(),
                    source,
                })?;
            }
        }
        Ok(())
    }
}

/// Now, RFC 3339 UTC to the second.
fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    crate::audit::record::format_time(now)
}

/// Whether the policy loader reads `path` (`*.yaml` / `*.yml`).
fn is_yaml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "yaml" || e == "yml")
}

fn read_text(path: &Path, max: u64) -> Result<String, BuildError> {
    let io = |source| BuildError::Io {
        path: path.to_owned(),
        source,
    };
    let bytes = read_bounded(path, max)
        .map_err(io)?
        .map_err(|size| BuildError::TooLarge {
            path: path.to_owned(),
            size,
            max,
        })?;
    String::from_utf8(bytes)
        .map_err(|e| io(io::Error::new(io::ErrorKind::InvalidData, e.utf8_error())))
}

/// The policy files of `dir` (absent: none), as the policy loader picks them.
fn read_policies(dir: &Path) -> Result<Vec<PolicyFile>, BuildError> {
    let io = |source| BuildError::Io {
        path: dir.to_owned(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other.map_err(io)?,
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(io)?.path();
        // `fs::metadata` follows symbolic links (ConfigMap mounts are links).
        if !is_yaml(&path) || !fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return Err(BuildError::NonUtf8Name { path });
        };
        let name = name.to_owned();
        if out.len() == super::MAX_POLICY_FILES {
            return Err(Rejection::Oversized {
                detail: format!(
                    "{}: more than {} policy files",
                    dir.display(),
                    super::MAX_POLICY_FILES
                ),
            }
            .into());
        }
        let text = read_text(&path, MAX_FILE_BYTES)?;
        out.push(PolicyFile { name, text });
    }
    Ok(out)
}
