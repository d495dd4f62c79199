//go:build tools

// Package tools pins the Kubernetes API server that scripts/dev-cluster builds: the real
// kube-apiserver of the release named in go.mod, its staging modules replaced by their
// published k8s.io/* versions.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
