//go:build tools

// Package tools pins the Kueue controller that the rung-3 tests run.
package tools

import _ "sigs.k8s.io/kueue/cmd/kueue"
