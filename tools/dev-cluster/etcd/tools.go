//go:build tools

// Package tools pins the etcd server that scripts/dev-cluster builds for the API server.
package tools

import _ "go.etcd.io/etcd/server/v3"
