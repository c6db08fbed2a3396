{{/* Labels every object of this chart carries. */}}
{{- define "lucity-builder.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Pod Security Admission labels for one level: enforce, and warn/audit the same. */}}
{{- define "lucity-builder.podSecurity" -}}
{{- $level := index . 0 -}}
{{- $version := index . 1 -}}
pod-security.kubernetes.io/enforce: {{ $level }}
pod-security.kubernetes.io/enforce-version: {{ $version }}
pod-security.kubernetes.io/warn: {{ $level }}
pod-security.kubernetes.io/warn-version: {{ $version }}
pod-security.kubernetes.io/audit: {{ $level }}
pod-security.kubernetes.io/audit-version: {{ $version }}
{{- end -}}
