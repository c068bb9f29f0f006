//! Where Kubernetes objects come from: manifest files, or the API server. Both sources speak
//! one language to the proxier, [`Change`].

pub(crate) mod files;
pub mod kube;
mod liveness;
pub mod manifests;
pub(crate) mod meta;

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use meta::namespace_or_default;

/// A complete set of objects: a manifest reload or an API relist.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
}

impl ObjectKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
        }
    }
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One object from a source.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    Node(Box<Node>),
}

/// Identity of an object, known even when its body does not parse (a manifest document) or
/// is gone (a deletion).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub kind: ObjectKind,
    /// Empty for a Node, which has none.
    pub namespace: String,
    pub name: String,
}

impl Identity {
    pub fn new(kind: ObjectKind, namespace: Option<&str>, name: Option<&str>) -> Self {
        Self {
            kind,
            namespace: if kind == ObjectKind::Node {
                String::new()
            } else {
                namespace_or_default(namespace)
            },
            name: name.unwrap_or_default().to_string(),
        }
    }
}

impl Object {
    pub fn identity(&self) -> Identity {
        let (kind, meta) = match self {
            Self::Service(s) => (ObjectKind::Service, &s.metadata),
            Self::Slice(s) => (ObjectKind::EndpointSlice, &s.metadata),
            Self::Node(n) => (ObjectKind::Node, &n.metadata),
        };
        Identity::new(kind, meta.namespace.as_deref(), meta.name.as_deref())
    }
}

/// Every object of one kind, as a relist delivers them.
#[derive(Clone, Debug, PartialEq)]
pub enum Listed {
    Services(Vec<Service>),
    Slices(Vec<EndpointSlice>),
    Nodes(Vec<Node>),
}

macro_rules! from_kind {
    ($type:ty, $object:ident, $listed:ident) => {
        impl From<$type> for Object {
            fn from(object: $type) -> Self {
                Self::$object(Box::new(object))
            }
        }

        impl From<Vec<$type>> for Listed {
            fn from(all: Vec<$type>) -> Self {
                Self::$listed(all)
            }
        }
    };
}

from_kind!(Service, Service, Services);
from_kind!(EndpointSlice, Slice, Slices);
from_kind!(Node, Node, Nodes);

impl Listed {
    pub fn kind(&self) -> ObjectKind {
        match self {
            Self::Services(_) => ObjectKind::Service,
            Self::Slices(_) => ObjectKind::EndpointSlice,
            Self::Nodes(_) => ObjectKind::Node,
        }
    }

    fn into_objects(self) -> Vec<Object> {
        match self {
            Self::Services(all) => all.into_iter().map(Object::from).collect(),
            Self::Slices(all) => all.into_iter().map(Object::from).collect(),
            Self::Nodes(all) => all.into_iter().map(Object::from).collect(),
        }
    }
}

/// What a source tells the proxier, one change at a time.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// An object was created or changed.
    Apply(Object),
    /// An object went away.
    Delete(Identity),
    /// One kind's complete list (a watch's initial list or a relist): objects of that kind not
    /// in it are gone.
    Replace(Listed),
}

/// The objects a stream of changes leaves (for tools and tests: the agent keeps only what its
/// inventory needs).
#[derive(Debug, Default)]
pub(crate) struct Objects(BTreeMap<Identity, Object>);

impl Objects {
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Apply(object) => {
                self.0.insert(object.identity(), object);
            }
            Change::Delete(identity) => {
                self.0.remove(&identity);
            }
            Change::Replace(listed) => {
                let kind = listed.kind();
                self.0.retain(|identity, _| identity.kind != kind);
                for object in listed.into_objects() {
                    self.0.insert(object.identity(), object);
                }
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::default();
        for object in self.0.values() {
            match object {
                Object::Service(s) => snap.services.push(s.as_ref().clone()),
                Object::Slice(s) => snap.slices.push(s.as_ref().clone()),
                Object::Node(n) => snap.nodes.push(n.as_ref().clone()),
            }
        }
        snap
    }
}
