{{/* Names, labels and lists shared by the templates. */}}

{{- define "kdistill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kdistill.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kdistill.operatorName" -}}
{{- printf "%s-operator" (include "kdistill.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kdistill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kdistill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kdistill.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kdistill.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kdistill
{{- end }}

{{- define "kdistill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kdistill.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kdistill.operatorImage" -}}
{{- printf "%s:%s" .Values.image.operator.repository (default .Chart.AppVersion .Values.image.operator.tag) }}
{{- end }}

{{- define "kdistill.trainerImage" -}}
{{- printf "%s:%s" .Values.image.trainer.repository (default .Chart.AppVersion .Values.image.trainer.tag) }}
{{- end }}

{{/* The namespaces the operator watches, as a list; empty in cluster mode. */}}
{{- define "kdistill.watchNamespaces" -}}
{{- if eq .Values.watch.mode "namespaced" }}
{{- $ns := .Values.watch.namespaces | default (list .Release.Namespace) }}
{{- toJson (uniq $ns) }}
{{- else }}
{{- toJson list }}
{{- end }}
{{- end }}
